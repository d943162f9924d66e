"""cg4ctr_fast.training: offline trainers and the data they read (imports nothing heavy on its own).

- `training.data`: click-log loaders (the sim world, CreativeRanking lists, CG4CTR JSON) → `AdLog`.
- `training.reward`: the reward (CTR) model trainer, `train_reward` / `save_reward_run`.
- `training.metrics`: AUC, logloss, NE, calibration, pairwise accuracy, uplift@k, the Beta prior.

Command line: `cg4ctr-train reward --data DIR --out MODEL_DIR` (`cg4ctr_fast.cli.train`).
"""
