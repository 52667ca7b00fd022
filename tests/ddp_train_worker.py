"""Run by test_sae_train under torchrun: train on DATA with the test config, rank 0 saves the SAE to OUT."""

import sys

import torch
import torch.distributed as dist

from sae.data import ShardReader
from sae.io import save_sae
from sae.train import SAETrainConfig, train

if __name__ == "__main__":
    data, out, cfg_json = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = train(ShardReader.from_dir(data, 512), SAETrainConfig(**__import__("json").loads(cfg_json)),
                   progress=False)
    if dist.get_rank() == 0:
        save_sae(result.sae, out, extra={"log": result.log})
    dist.destroy_process_group()
