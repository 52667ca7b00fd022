"""Analysis building blocks: profiles, peaks, examples, frequencies, comparisons, concepts, histograms and figures.

The stage that runs them in order is backend/stages/analysis.py."""
