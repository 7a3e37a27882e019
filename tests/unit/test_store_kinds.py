"""The model store's light check that a file's tensors fit the kind it is added as (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.models.store_registry import kind_mismatch

KOHYA = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
         "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}
PEFT = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}
EMBEDDING = {"emb_params": (2, 768)}
SDXL_EMBEDDING = {"clip_l": (2, 768), "clip_g": (2, 1280)}
VAE = {"decoder.conv_in.weight": (512, 4, 3, 3), "encoder.conv_in.weight": (128, 3, 3, 3)}


@pytest.mark.parametrize(("kind", "shapes"), [("lora", KOHYA), ("lora", PEFT), ("embedding", EMBEDDING),
                                              ("embedding", SDXL_EMBEDDING), ("vae", VAE)])
def test_files_of_their_kind_pass(kind: str, shapes: dict) -> None:
    assert kind_mismatch(kind, shapes) is None


@pytest.mark.parametrize(("kind", "shapes", "said"), [("lora", EMBEDDING, "not a LoRA"),
                                                     ("embedding", KOHYA, "embedding"),
                                                     ("vae", KOHYA, "not a VAE"), ("lora", VAE, "not a LoRA")])
def test_a_file_added_as_the_wrong_kind_is_refused(kind: str, shapes: dict, said: str) -> None:
    message = kind_mismatch(kind, shapes)
    assert message is not None and said in message


def test_a_controlnet_location_is_found_in_a_worker_folder_of_another_name(tmp_path: Path) -> None:
    from shared.controlnet.models import controlnet_path, controlnet_relpath

    mine = tmp_path / "models-w1"
    (mine / "ControlNet").mkdir(parents=True)
    (mine / "ControlNet" / "x.safetensors").write_bytes(b"")
    assert controlnet_path(mine, "models-api/ControlNet/x.safetensors") == mine / "ControlNet" / "x.safetensors"
    assert controlnet_path(mine, "models-w1/ControlNet/x.safetensors") == mine / "ControlNet" / "x.safetensors"
    extension = "extensions/sd-webui-controlnet/models/y.safetensors"
    assert controlnet_path(mine, extension) == tmp_path / extension  # the extension's folder stays where it is
    assert controlnet_relpath("models-api/ControlNet/sub/x.safetensors") == "ControlNet/sub/x.safetensors"
    assert controlnet_relpath(extension) is None


def test_an_upscaler_name_carries_its_folder_and_only_upscalers_may_be_pickles() -> None:
    from shared.errors import FieldError
    from shared.models.store_registry import check_name

    assert check_name("4x-UltraSharp.pth", kind="upscaler") == "ESRGAN/4x-UltraSharp.pth"
    assert check_name("RealESRGAN/RealESRGAN_x4plus.pth", kind="upscaler") == "RealESRGAN/RealESRGAN_x4plus.pth"
    assert check_name("DAT/x.safetensors", kind="upscaler") == "DAT/x.safetensors"
    for name, kind, said in (("Other/x.pth", "upscaler", "starts with its folder"), ("x.pth", "lora", "pickles"),
                             ("x.ckpt", "upscaler", "pickles"), ("x.bin", "checkpoint", "pickles"),
                             ("../x.safetensors", "lora", "not a file name")):
        with pytest.raises(FieldError) as raised:
            check_name(name, kind=kind)
        assert said in raised.value.message, (name, kind, raised.value.message)
