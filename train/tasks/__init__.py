"""Built-in tasks: `train.tasks.gpt:TinyGPT` and `train.tasks.mlp:MLPRegression`."""
