"""seglight's commands, one module each; only seglight.cli imports them (lazily, by name).

train     fit / validate / test / predict through LightningCLI
listings  models, datasets
stats, compare, sweep, export, bench
"""
