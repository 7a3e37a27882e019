"""WebUI prompt conditioning on the tiny demo model's real CLIP tokenizer and text encoder.

Emphasis with mean restoration, 75-token chunks, BREAK, comma word-wrap, clip skip, scheduled and
alternating prompts (which conditioning each model evaluation gets), AND with weights, embeddings
and malformed syntax.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devtools.demo_models.sd15 import build_demo_checkpoint
from shared.webui.prompts import prompt_schedules
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.conditioning import (
    PromptEncoder,
    build_conditioning,
    hires_timeline_prompt,
    strip_extra_networks,
)
from worker.engine.denoise import guided_noise
from worker.engine.embeddings import EmbeddingLibrary

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    path = build_demo_checkpoint(tmp_path_factory.mktemp("cond") / "demo.safetensors")
    return load_pipeline(path)


@pytest.fixture
def encoder(pipe) -> PromptEncoder:
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


def real_tokens(chunk) -> list[int]:
    return [t for t in chunk.tokens[1:-1] if t != 49407]


def test_emphasis_weights_change_the_tokens_and_the_mean_is_restored(pipe, encoder):
    plain = encoder.encode(["a cat on a mat"])
    weighted = encoder.encode(["a (cat:1.5) on a mat"])
    assert plain.shape == weighted.shape == (1, 77, 32)
    assert not torch.equal(plain, weighted)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    # Every token is rescaled by the same factor; "cat" (position 2) also by its weight.
    ratio = weighted / plain
    factor = ratio[0, 0, 0]
    assert torch.allclose(ratio[0, 1], factor.expand(32), rtol=1e-4)
    assert torch.allclose(ratio[0, 2], (1.5 * factor).expand(32), rtol=1e-4)


def test_weight_of_one_leaves_the_encoding_unchanged(encoder):
    assert torch.equal(encoder.encode(["a cat"]), encoder.encode(["a (cat:1.0)"]))


def test_a_prompt_over_75_tokens_is_encoded_in_two_chunks(encoder):
    prompt = " ".join(["cat"] * 80)
    chunks = encoder.tokenize_line(prompt)
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert len(real_tokens(chunks[0])) == 75 and len(real_tokens(chunks[1])) == 5
    assert chunks[0].tokens[0] == 49406 and chunks[0].tokens[-1] == 49407
    assert encoder.encode([prompt]).shape == (1, 154, 32)


def test_break_starts_a_new_chunk(encoder, pipe):
    chunks = encoder.tokenize_line("a cat BREAK a dog")
    assert len(chunks) == 2
    dog = pipe.tokenizer(["a dog"], add_special_tokens=False)["input_ids"][0]
    assert real_tokens(chunks[1]) == dog
    assert encoder.encode(["a cat BREAK a dog"]).shape == (1, 154, 32)


def test_words_after_the_last_comma_move_to_the_next_chunk(encoder):
    chunks = encoder.tokenize_line(" ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10))
    dog = encoder.tokenizer(["dog"], add_special_tokens=False)["input_ids"][0][0]
    assert dog not in chunks[0].tokens
    assert real_tokens(chunks[1]) == [dog] * 10


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_layer_norm(pipe):
    skip1 = PromptEncoder(pipe.tokenizer, pipe.text_encoder, clip_skip=1).encode(["a red house"])
    skip2 = PromptEncoder(pipe.tokenizer, pipe.text_encoder, clip_skip=2).encode(["a red house"])
    assert not torch.allclose(skip1, skip2)
    ids = torch.tensor([PromptEncoder(pipe.tokenizer, pipe.text_encoder).tokenize_line("a red house")[0].tokens])
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        expected = pipe.text_encoder.final_layer_norm(hidden)
    assert torch.allclose(skip2, expected, atol=1e-6)


def test_scheduled_prompt_switches_after_the_webui_step(encoder):
    # [[2, 'a cat photo'], [4, 'a dog photo']]: evaluations 0, 1, 2 use cat, 3 uses dog.
    conditioning = build_conditioning(encoder, "a [cat:dog:2] photo", "", steps=4)
    both = encoder.encode(["a cat photo", "a dog photo"])
    used = [conditioning.at_step(step).conds[0] for step in range(4)]
    for step in (0, 1, 2):
        assert torch.equal(used[step], both[0])
    assert torch.equal(used[3], both[1])


def test_alternating_prompt_follows_the_webui_schedule(encoder):
    assert prompt_schedules("[cat|dog]", 4) == [[1, "cat"], [2, "dog"], [3, "cat"], [4, "dog"]]
    conditioning = build_conditioning(encoder, "[cat|dog]", "", steps=4)
    cat, dog = encoder.encode(["cat", "dog"])[:2]
    picked = ["cat" if torch.allclose(conditioning.at_step(s).conds[0], cat) else "dog" for s in range(4)]
    # reconstruct_cond_batch: the first segment whose end >= the 0-based evaluation index.
    assert picked == ["cat", "cat", "dog", "cat"]


def test_and_subprompts_carry_their_weights_and_pad_to_the_longest(encoder):
    conditioning = build_conditioning(encoder, "a cat AND " + " ".join(["dog"] * 80) + " :0.5", "blurry", 4)
    step = conditioning.at_step(0)
    assert step.weights == [1.0, 0.5]
    assert step.conds.shape == (2, 154, 32)
    assert torch.equal(step.conds[0, 77:], step.conds[0, 76:77].expand(77, 32))  # last vector repeated
    assert step.uncond.shape == (77, 32)


def test_composable_guidance_combines_like_the_webui():
    class StubUnet:
        dtype = torch.float32

        def __call__(self, x, t, encoder_hidden_states):
            # Each row's "prediction" is the mean of its conditioning, so rows are distinguishable.
            out = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand(x.shape).clone()
            return type("Out", (), {"sample": out})()

    from worker.engine.conditioning import StepConditioning

    cond = StepConditioning(torch.full((3, 4), 1.0), torch.stack([torch.full((3, 4), 2.0), torch.full((3, 4), 5.0)]),
                            [1.0, 0.5])
    eps = guided_noise(StubUnet(), torch.zeros(1, 4, 2, 2), 10, [cond], [7.0])
    expected = 1.0 + 1.0 * 7.0 * (2.0 - 1.0) + 0.5 * 7.0 * (5.0 - 1.0)
    assert torch.allclose(eps, torch.full((1, 4, 2, 2), expected))


def test_negative_prompt_takes_the_same_syntax(encoder):
    plain = build_conditioning(encoder, "a cat", "blurry photo", 4).at_step(0).uncond
    weighted = build_conditioning(encoder, "a cat", "(blurry:1.4) photo", 4).at_step(0).uncond
    scheduled = build_conditioning(encoder, "a cat", "[blurry:sharp:1] photo", 4)
    assert not torch.equal(plain, weighted)
    assert not torch.equal(scheduled.at_step(0).uncond, scheduled.at_step(3).uncond)


def test_lora_tags_are_removed_before_encoding(encoder):
    assert strip_extra_networks("a cat <lora:style:0.8>") == "a cat "
    assert strip_extra_networks("a cat <lora:style:abc>") == "a cat "  # a bad weight is no error
    tagged = build_conditioning(encoder, "a cat<lora:style:0.8>", "", 4).at_step(0).conds[0]
    assert torch.equal(tagged, encoder.encode(["a cat"])[0])


@pytest.mark.parametrize("prompt", ["(a:1.2.3) cat", "[unbalanced (x BREAK", "a [b:c:", "a | b ]]", "\\", "",
                                    "<lora:x:abc> [a|", "((((((((((deep", "[a:b:1e309]"])
def test_malformed_syntax_is_encoded_as_text(encoder, prompt):
    conditioning = build_conditioning(encoder, prompt, prompt, 4)
    assert conditioning.at_step(0).conds.shape[-1] == 32


def test_hires_pass_uses_the_webui_hires_timeline():
    assert hires_timeline_prompt("a [b:c:1.5] d", 20, 10) == "a [b:c:5] d"
    assert hires_timeline_prompt("a [b:c:25] d", 20, 10) == "a [b:c:5] d"
    # A switch that happened during the first pass stays switched for the whole second pass.
    rewritten = hires_timeline_prompt("a [b:c:0.5] d", 20, 10)
    assert prompt_schedules(rewritten, 10) == [[10, "a c d"]]
    assert hires_timeline_prompt("(x:1.5) [a|b]", 20, 10) == "(x:1.5) [a|b]"


def write_embedding(folder: Path, name: str, vectors: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({"emb_params": vectors.contiguous()}, str(path))
    return path


def test_embeddings_are_injected_by_name_without_touching_the_model(pipe, tmp_path):
    folder = tmp_path / "embeddings"
    write_embedding(folder, "shinystyle", torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    write_embedding(folder, "wideemb", torch.randn(3, 768))  # another model family: skipped
    library = EmbeddingLibrary(folder)
    available = library.available(32)
    assert list(available) == ["shinystyle"]
    token_weights = pipe.text_encoder.get_input_embeddings().weight.clone()

    with_embedding = PromptEncoder(pipe.tokenizer, pipe.text_encoder, available)
    chunk = with_embedding.tokenize_line("a (shinystyle:1.2) cat")[0]
    assert [offset for offset, _ in chunk.fixes] == [2]
    assert chunk.tokens[2:4] == [0, 0] and chunk.multipliers[2:4] == [1.2, 1.2]
    encoded = with_embedding.encode(["a shinystyle cat"])
    assert "shinystyle" in with_embedding.used_embeddings

    without = PromptEncoder(pipe.tokenizer, pipe.text_encoder).encode(["a shinystyle cat"])
    placeholders = PromptEncoder(pipe.tokenizer, pipe.text_encoder).encode(["a !! cat"])
    assert not torch.allclose(encoded, without) and not torch.allclose(encoded, placeholders)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, token_weights)
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks
    # The next prompt without the name sees nothing of it.
    plain = PromptEncoder(pipe.tokenizer, pipe.text_encoder).encode(["a cat"])
    assert torch.equal(with_embedding.encode(["a cat"]), plain)
