"""Instruction following, IFEval style: what the demo, the examples and the benchmarks train and measure on.

- [`rewards`]: IFEval reward functions for GRPO / UniAPL (lm-eval's checkers), e.g. `ifeval_dense_reward`, usable as
  `trl grpo --reward_funcs trl_uniapl.ifeval.rewards.ifeval_dense_reward`;
- [`task`]: an offline IFEval-format task with a programmatic expert (its topics are package data, `data/topics.json`);
- [`evaluation`]: IFEval metrics, unrequested effects and the paper's length and log-probability analyses.

None of it is needed to use [`UniAPLTrainer`] on your own data.
"""
