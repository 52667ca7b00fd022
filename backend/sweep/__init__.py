"""Sweeps: one run per combination of config values, run one after another here or submitted to SLURM.

    grid.py      KEY=V1,V2 arguments -> the grid, its combinations, their run names and configs (validated)
    manifest.py  sweeps/<name>/sweep.json: base config, grid, runs and their status (atomic writes)
    profiles.py  infrastructure profiles (configs/infra/*.toml): partition, resources, setup lines
    share.py     a sweep run that captures what an earlier run captured starts from its capture (hard links)
    task.py      one run of a sweep: resolve its config, run-all it (resumes), record its status
    local.py     the local executor: the runs in order, in this process
    slurm.py     the SLURM executor: a submitit job array, its sbatch script, job states
    command.py   `python cli.py sweep`: plan, then run / submit / dry-run / status
"""
