"""Hypernetworks rebuilt and applied as the WebUI does (modules/hypernetworks/hypernetwork.py), issue 15."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from shared.errors import FieldError
from worker.engine.hypernetworks import HypernetworkModule, applied, load_hypernetwork


def _keys(**flags: object) -> list[str]:
    settings = dict(layer_structure=[1, 2, 1], activation=None, layer_norm=False, dropout=False,
                    activate_output=False, last_layer_dropout=False) | flags
    return list(HypernetworkModule(8, **settings).state_dict())  # type: ignore[arg-type]


def test_the_modules_are_laid_out_as_the_webui_saves_them() -> None:
    assert _keys() == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    assert _keys(activation="relu") == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"]
    assert _keys(activation="relu", layer_norm=True) == [
        "linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias", "linear.3.weight", "linear.3.bias",
        "linear.4.weight", "linear.4.bias"]
    # dropout after every layer but the last two (the last one too with last_layer_dropout), activation on the output
    assert _keys(layer_structure=[1, 2, 2, 1], activation="swish", dropout=True, activate_output=True) == [
        "linear.0.weight", "linear.0.bias", "linear.3.weight", "linear.3.bias", "linear.5.weight", "linear.5.bias"]


def webui_file(path: Path, sizes: tuple[int, ...], scale: float, **settings: object) -> Path:
    generator = torch.Generator().manual_seed(0)

    def module(width: int) -> dict[str, torch.Tensor]:
        return {"linear.0.weight": torch.randn(width * 2, width, generator=generator) * scale,
                "linear.0.bias": torch.zeros(width * 2),
                "linear.1.weight": torch.randn(width, width * 2, generator=generator) * scale,
                "linear.1.bias": torch.zeros(width)}

    state: dict[object, object] = {size: [module(size), module(size)] for size in sizes}
    state.update({"layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False,
                  "use_dropout": False, "name": path.stem, "step": 0} | settings)
    torch.save(state, path)
    return path


def test_keys_and_values_go_through_the_modules_and_everything_is_restored(tmp_path: Path) -> None:
    attention = Attention(query_dim=32, cross_attention_dim=32, heads=2, dim_head=16).eval()
    x, context = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    before = attention(x, encoder_hidden_states=context)
    original = attention.to_k
    strong = load_hypernetwork(webui_file(tmp_path / "strong.pt", (32,), 0.5))
    with torch.no_grad(), applied(attention, [(strong, 1.0)]):
        changed = attention(x, encoder_hidden_states=context)
        k = strong.layers[32][0]
        assert torch.allclose(attention.to_k(context), original(context + k.linear(context)))
    with torch.no_grad(), applied(attention, [(strong, 0.0)]):
        assert torch.equal(attention(x, encoder_hidden_states=context), before)  # multiplier 0: x + 0
    other = load_hypernetwork(webui_file(tmp_path / "other.pt", (64,), 0.5))
    with torch.no_grad(), applied(attention, [(other, 1.0)]):
        assert torch.equal(attention(x, encoder_hidden_states=context), before)  # no module for width 32
    assert attention.to_k is original and not torch.allclose(changed, before)
    assert torch.equal(attention(x, encoder_hidden_states=context), before)


def test_a_file_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    from devtools.demo_models.upscalers import write_booby_trapped_pth

    marker = tmp_path / "ran"
    with pytest.raises(FieldError, match="weights-only"):
        load_hypernetwork(write_booby_trapped_pth(tmp_path / "trap.pt", marker))
    assert not marker.exists()
