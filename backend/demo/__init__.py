"""The demo world: coloured shapes with known concepts, the demo model's training and evaluation."""
