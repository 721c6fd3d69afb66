"""Shared settings for tests that train: a tiny model on tiny synthetic data."""

TINY_OVERRIDES = [
    "model.arch=resnet8",
    "data.dataset=synthetic",
    "data.synthetic.num_train=112",
    "data.synthetic.num_test=32",
    "data.synthetic.image_size=8",
    "data.synthetic.num_classes=4",
    "data.val_size=16",
    "data.batch_size=16",
    "model.bn_group_size=8",  # the paper recipes' ghost batches (32 or 64 images) scaled to the tiny batch
    "data.eval_batch_size=32",
    "data.num_workers=0",
    "eval.pgd_steps=2",
    "output.tensorboard=false",
]


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    """`gkl ARGS` through the real entry point (in-process): (exit code, stdout, stderr)."""
    import pytest

    from gklcli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err
