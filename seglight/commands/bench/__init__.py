"""`python -m seglight bench`: training and inference speed and peak memory of a seglight
architecture, side by side with the same network in a hand-written PyTorch loop and with its
segmentation_models_pytorch / torchvision equivalent, in one process, interleaved; and the
throughput of a dataset's DataLoader next to its GPU-resident path.

    python -m seglight bench --model UNet --model.encoder resnet34 --size 256 256 --batch-size 2
    python -m seglight bench --config experiments/unet.yaml --data.root /data/camvid
    python -m seglight bench --loader 0,1,2 --config experiments/unet.yaml --data.root /data/camvid

One module per concern, each importing only those above it in this list:
measure    the clock, the memory meter, the confidence interval of a median ratio
peers      the networks under test and the plain loops that train them (what makes it fair)
training   seglight in Trainer.fit against the peers' loops, interleaved rounds
inference  eval-mode forward + argmax, interleaved rounds
losses     forward + backward of each loss (--losses)
data       the DataLoader against the resident path; the loader's per-sample costs (--loader)
report     the tables
command    the options, and the runs they ask for

A ratio is the median of the per-round ratios (seglight's round k over the peer's round k, which
ran beside it, so a slow spell of the machine hits both), with a distribution-free 95%
confidence interval of that median (order statistics): if the interval excludes 1.00 +- 0.02,
the difference is resolved; if not, add rounds.
"""

from seglight.commands.bench.command import main, parse_args, run

__all__ = ["main", "parse_args", "run"]
