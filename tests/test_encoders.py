"""Pretrained encoder weights: from a local file, a local hub cache, a URL (local server), and the
clear error when none of them is available. Nothing here touches the network."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from seglight.models import UNet
from seglight.nn import EncoderWeightsError


def reference_weights(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(name).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_file(tmp_path, suffix):
    sd = reference_weights("resnet18")
    path = tmp_path / f"r18{suffix}"
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    model = UNet(num_classes=3, encoder="resnet18", encoder_weights=str(path))
    enc = model.net.encoder.model
    assert torch.equal(enc.conv1.weight, sd["conv1.weight"])
    assert torch.equal(enc.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert torch.equal(enc.layer2[0].bn1.running_mean, sd["layer2.0.bn1.running_mean"])


def test_weights_wrapped_in_a_checkpoint_dict_and_other_in_channels(tmp_path):
    sd = reference_weights("resnet18")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    model = UNet(
        num_classes=3, in_channels=1, encoder="resnet18", encoder_weights=str(tmp_path / "ckpt.pth")
    )
    conv1 = model.net.encoder.model.conv1.weight
    assert conv1.shape == (64, 1, 7, 7)
    assert torch.allclose(
        conv1[:, 0], sd["conv1.weight"].sum(1), atol=1e-6
    )  # timm sums RGB for 1 channel
    assert torch.equal(model.net.encoder.model.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(reference_weights("resnet34"), tmp_path / "r34.pth")
    with pytest.raises(
        EncoderWeightsError, match=r"r34.pth' does not fit timm model 'resnet18'.*unexpected"
    ):
        UNet(num_classes=3, encoder="resnet18", encoder_weights=str(tmp_path / "r34.pth"))


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(EncoderWeightsError, match=r"no such file .*nope.pth"):
        UNet(num_classes=3, encoder="resnet18", encoder_weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match=r"cannot read .*junk.pth"):
        UNet(num_classes=3, encoder="resnet18", encoder_weights=str(tmp_path / "junk.pth"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_imagenet_from_the_local_hub_cache(tmp_path, monkeypatch):
    cfg = timm.models.get_pretrained_cfg("resnet18")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sd = reference_weights("resnet18", seed=1)
    save_file(sd, repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # would fail if used
    model = UNet(num_classes=3, encoder="resnet18", encoder_weights="imagenet")
    assert torch.equal(model.net.encoder.model.conv1.weight, sd["conv1.weight"])


def test_imagenet_offline_without_cache_is_a_fast_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(EncoderWeightsError) as info:
        UNet(num_classes=3, encoder="resnet18", encoder_weights="imagenet")
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "resnet18" in message and "not in the local cache" in message
    assert "--model.encoder_weights /path/to/" in message  # says how to pass a local file


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_weights_from_a_url_served_locally(tmp_path, monkeypatch):
    sd = reference_weights("resnet18", seed=2)
    (tmp_path / "www").mkdir()
    torch.save(sd, tmp_path / "www" / "r18-test.pth")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www")
    )
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/r18-test.pth"
        model = UNet(num_classes=3, encoder="resnet18", encoder_weights=url)
    finally:
        server.shutdown()
    assert torch.equal(model.net.encoder.model.conv1.weight, sd["conv1.weight"])
    cached = list((tmp_path.parent).glob("**/weights/r18-test.pth"))  # SEGLIGHT_CACHE/weights/
    assert cached, "the downloaded file is cached"
