"""What ``lightning-peft`` says about itself (the console script and the Lightning CLI print it)."""

OVERVIEW = """lightning-peft: parameter-efficient fine-tuning with PyTorch Lightning.

subcommands:
  fit, validate, test, predict   LightningCLI with lightning_peft.Trainer (--config run.yaml)
  export                         a checkpoint's adapters as a PEFT folder and/or merged model
  memory                         memory to fine-tune a model of a given size (70B, 135M, ...)
  serve                          one base, many adapters over HTTP (LitServe; pip install
                                 'lightning-peft[serve]')

'lightning-peft SUBCOMMAND --help' describes each (fit --help: every option of the run).
"""
