"""The converter CLI: reference-layout drafters, Hugging Face / GGUF base models, export, hub ids.

The parity tests build a drafter in the reference (PyTorch) layout with torch from the published
formula (docs/DESIGN.md section 2) and check that the converted MLX drafter reproduces its logits
and its beam search. Every failure case checks the message and that nothing is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx_redrafter._blas  # noqa: F401  (OpenBLAS must be loaded before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import _get_classes

import mlx_redrafter
from mlx_redrafter.convert import cli
from mlx_redrafter.drafter import MODEL_TYPE, Drafter, DrafterConfig
from mlx_redrafter.models import DRAFTER_PATTERNS

ROOT = Path(__file__).resolve().parents[1]

VOCAB, HIDDEN = 128, 64
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# ------------------------------------------------------------------------------ helpers
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def expect_error(capsys, *argv, match: str, outdir: Path | None = None) -> str:
    before = sorted(p.name for p in outdir.iterdir()) if outdir is not None else None
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_redrafter.convert: error: "), err
    assert match in lines[0], lines[0]
    if outdir is not None:  # no output folder, no hidden temporary folder
        assert sorted(p.name for p in outdir.iterdir()) == before
    return lines[0]


def reference_config(vocab=VOCAB, hidden=HIDDEN, exit_dim=96, layers=2, rnn=True) -> dict:
    """config.json as the reference trainer's `save_pretrained` writes it (transformers)."""
    return {
        "architectures": ["Drafter"],
        "exit_dim": exit_dim,
        "hidden_size": hidden,
        "model_type": MODEL_TYPE,
        "num_draft_layers": layers,
        "num_lookback_tokens": -1,
        "rnn": rnn,
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
        "vocab_size": vocab,
    }


def write_reference_drafter(folder: Path, seed=1, **config_kw) -> dict[str, mx.array]:
    """A reference-layout drafter folder written without torch (safetensors, torch metadata)."""
    cfg = reference_config(**config_kw)
    mx.random.seed(seed)
    drafter = Drafter(
        DrafterConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            exit_dim=cfg["exit_dim"],
            num_draft_layers=cfg["num_draft_layers"],
            rnn=cfg["rnn"],
        )
    )
    weights = dict(tree_flatten(drafter.parameters()))
    if not cfg["rnn"]:
        weights = {k: v for k, v in weights.items() if not k.startswith("rnn_")}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return weights


def make_llama_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    return {k: np.array(v * 2.0 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())}


def mlx_lm_model(config: dict, weights: dict[str, np.ndarray]) -> nn.Module:
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "t1",
                "eos_token": "t2",
                "unk_token": "t0",
                "chat_template": "{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}",
            }
        )
    )


def write_hf_model(folder: Path, config: dict = HF_CONFIG, weights=None, fmt="safetensors"):
    """A tiny Hugging Face llama folder: config.json, weights, tokenizer files."""
    from safetensors.numpy import save_file

    weights = make_llama_weights(config) if weights is None else weights
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        import torch

        torch.save(
            {k: torch.from_numpy(v) for k, v in weights.items()}, folder / "pytorch_model.bin"
        )
    write_tokenizer(folder)
    return weights


def mlx_weights(folder: Path) -> dict[str, mx.array]:
    return mx.load(str(folder / "model.safetensors"))


def assert_same_weights(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    weights = write_hf_model(folder)
    return folder, weights


@pytest.fixture(scope="module")
def ref_drafter_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref") / "drafter"
    write_reference_drafter(folder)
    return folder


@pytest.fixture
def outdir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------------------ torch reference
def torch_reference(vocab, hidden, exit_dim, layers, rnn, seed=0):
    """The reference drafter, written here from docs/DESIGN.md section 2 (not imported)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    class ResBlock(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.linear = torch.nn.Linear(dim, dim)

        def forward(self, x):
            return x + F.silu(self.linear(x))

    class ReferenceDrafter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if exit_dim != 2 * hidden:
                self.input_proj = torch.nn.Linear(2 * hidden, exit_dim)
            self.lm_head = torch.nn.Sequential(
                *[ResBlock(exit_dim) for _ in range(layers)],
                torch.nn.Linear(exit_dim, vocab, bias=False),
            )
            if rnn:
                self.rnn_u = torch.nn.Linear(hidden, hidden)
                self.rnn_w = torch.nn.Linear(hidden, hidden, bias=False)

        def head_logits(self, h, s):
            x = torch.cat([h, s], dim=-1)
            if exit_dim != 2 * hidden:
                x = self.input_proj(x)
            return self.lm_head(x)

        def log_probs(self, h, s):
            logits = self.head_logits(h, s)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            kth = torch.topk(logits, min(50, vocab), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -50000.0)
            return torch.log_softmax(logits, dim=-1)

        def step(self, state, emb):
            if rnn:
                return F.silu(self.rnn_w(emb) + self.rnn_u(state))
            return emb + state

        def beam_search(self, h, g0, embedding, width, length):
            beams = torch.full((width, 1), g0, dtype=torch.long)
            scores = torch.tensor([0.0] + [-5e4] * (width - 1))
            state = torch.zeros(width, hidden)
            context = h.reshape(1, -1).expand(width, -1)
            steps = torch.zeros(width, 0, vocab)
            for _ in range(length - 1):
                state = self.step(state, embedding(beams[:, -1]))
                lp = self.log_probs(context, state)
                total = (scores[:, None] + lp).reshape(-1)
                scores, best = torch.topk(total, width)  # sorted, descending
                parent, token = best // vocab, best % vocab
                beams = torch.cat([beams[parent], token[:, None]], dim=1)
                state = state[parent]
                steps = torch.cat([steps[parent], lp[parent][:, None]], dim=1)
            return beams, steps

    torch.manual_seed(seed)
    model = ReferenceDrafter()
    with torch.no_grad():  # spread the logits: fewer near-ties between beams
        for p in model.parameters():
            p.mul_(3.0)
    embedding = torch.nn.Embedding(vocab, hidden)
    return torch, model, embedding


def save_torch_drafter(torch, model, folder: Path, fmt: str, config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))


PARITY_CASES = [
    # exit_dim, layers, rnn, format
    (96, 2, True, "safetensors"),
    (96, 2, True, "bin"),
    (2 * HIDDEN, 1, False, "safetensors"),
]


@pytest.mark.parametrize("exit_dim,layers,rnn,fmt", PARITY_CASES)
def test_parity_with_reference_drafter(capsys, tmp_path, exit_dim, layers, rnn, fmt):
    torch, ref, embedding = torch_reference(VOCAB, HIDDEN, exit_dim, layers, rnn)
    src = tmp_path / "torch-drafter"
    config = reference_config(exit_dim=exit_dim, layers=layers, rnn=rnn)
    save_torch_drafter(torch, ref, src, fmt, config)
    rc, out, err = run_cli(capsys, "--drafter-path", src, "--mlx-path", tmp_path / "mlx")
    assert rc == 0, err
    assert "wrote the MLX drafter" in out
    drafter = Drafter.from_pretrained(tmp_path / "mlx")
    assert drafter.config.rnn is rnn and drafter.config.has_input_proj is (exit_dim != 2 * HIDDEN)
    embed = nn.Embedding(VOCAB, HIDDEN)
    embed.weight = mx.array(embedding.weight.detach().numpy())

    rng = np.random.default_rng(0)
    h = rng.standard_normal((8, HIDDEN)).astype(np.float32)
    s = rng.standard_normal((8, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        ref_logits = ref.head_logits(torch.from_numpy(h), torch.from_numpy(s)).numpy()
        ref_lp = ref.log_probs(torch.from_numpy(h), torch.from_numpy(s)).numpy()
    logits = np.array(drafter.head_logits(mx.array(h), mx.array(s)))
    lp = np.array(drafter.draft_log_probs(mx.array(h), mx.array(s)))
    assert np.abs(logits - ref_logits).max() < 1e-4
    kept = ref_lp > -1000  # the top-50 entries; the rest sit near -50000
    assert (kept == (lp > -1000)).all()
    assert np.abs(lp[kept] - ref_lp[kept]).max() < 1e-4

    for trial, (width, length) in enumerate([(4, 5), (3, 4), (1, 5)]):
        hidden = rng.standard_normal(HIDDEN).astype(np.float32)
        g0 = int(rng.integers(VOCAB))
        with torch.no_grad():
            ref_beams, ref_steps = ref.beam_search(
                torch.from_numpy(hidden), g0, embedding, width, length
            )
        beams, steps = drafter.beam_search(mx.array(hidden), mx.array(g0), embed, width, length)
        assert np.array_equal(np.array(beams), ref_beams.numpy()), trial
        ref_steps = ref_steps.numpy()
        steps = np.array(steps)
        kept = ref_steps > -1000
        assert np.abs(steps[kept] - ref_steps[kept]).max() < 1e-4

    # the converted drafter exports back to exactly the reference module's state dict
    rc, _, err = run_cli(
        capsys, "--drafter-path", tmp_path / "mlx", "--export-torch", tmp_path / "x"
    )
    assert rc == 0, err
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "x" / "model.safetensors"))
    state = ref.state_dict()
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        assert torch.equal(exported[key], value), key
    fresh = torch_reference(VOCAB, HIDDEN, exit_dim, layers, rnn, seed=1)[1]
    fresh.load_state_dict(exported, strict=True)
    exported_config = json.loads((tmp_path / "x" / "config.json").read_text())
    for key in ("model_type", "vocab_size", "hidden_size", "exit_dim", "num_draft_layers", "rnn"):
        assert exported_config[key] == config[key], key


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bfloat16_reference_checkpoint(capsys, tmp_path, fmt):
    torch, ref, _ = torch_reference(VOCAB, HIDDEN, 96, 1, True)
    ref = ref.to(torch.bfloat16)
    save_torch_drafter(torch, ref, tmp_path / "bf16", fmt, reference_config(layers=1))
    rc, _, err = run_cli(capsys, "--drafter-path", tmp_path / "bf16", "--mlx-path", tmp_path / "m")
    assert rc == 0, err
    converted = mlx_weights(tmp_path / "m")
    for key, value in ref.state_dict().items():
        assert converted[key].dtype == mx.bfloat16, key
        assert np.array_equal(np.array(converted[key].astype(mx.float32)), value.float().numpy())
    assert Drafter.from_pretrained(tmp_path / "m").config.torch_dtype == "bfloat16"


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_export_round_trip_is_identical(capsys, tmp_path, dtype):
    mx.random.seed(3)
    drafter = Drafter(DrafterConfig(vocab_size=VOCAB, hidden_size=HIDDEN, exit_dim=80))
    if dtype:
        drafter.set_dtype(getattr(mx, dtype))
        drafter.config.torch_dtype = dtype
    drafter.save_pretrained(tmp_path / "mlx")
    rc, _, err = run_cli(
        capsys, "--drafter-path", tmp_path / "mlx", "--export-torch", tmp_path / "pt"
    )
    assert rc == 0, err
    config = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["torch_dtype"] == (dtype or "float32")
    assert "draft_vocab_size" not in config
    rc, _, err = run_cli(
        capsys, "--drafter-path", tmp_path / "pt", "--mlx-path", tmp_path / "again"
    )
    assert rc == 0, err
    assert_same_weights(mlx_weights(tmp_path / "mlx"), mlx_weights(tmp_path / "again"))
    assert_same_weights(mlx_weights(tmp_path / "mlx"), mlx_weights(tmp_path / "pt"))
    again = Drafter.from_pretrained(tmp_path / "again")
    assert again.config.exit_dim == 80 and again.config.torch_dtype == (dtype or "float32")


REDUCED_CASES = [
    # exit_dim, layers, rnn, draft vocabulary size
    (80, 2, True, 100),  # input_proj; N >= 50: the reference's top-50 warp keeps draft tokens only
    (2 * HIDDEN, 1, False, 32),  # no input_proj (an identity one is added); N < 50
    (2 * HIDDEN - 1, 0, True, 64),  # exit_dim + 1 = 2 * hidden: a second (zero) dimension
]


@pytest.mark.parametrize("exit_dim,layers,rnn,n_draft", REDUCED_CASES)
def test_export_of_a_reduced_vocabulary_gives_the_same_beams(
    capsys, tmp_path, exit_dim, layers, rnn, n_draft
):
    """The reference layout has no id map: the export expands the head to the full vocabulary
    (convert/full_vocab.py). The reference's own beam search (the torch model written from
    docs/DESIGN.md above) on the exported files must give the reduced drafter's beams, and so must
    the export read back through the converter."""
    config = DrafterConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, exit_dim=exit_dim, num_draft_layers=layers,
        rnn=rnn, draft_vocab_size=n_draft,
    )  # fmt: skip
    mx.random.seed(4)
    drafter = Drafter(config)
    drafter.update(tree_map(lambda p: p * 3.0, drafter.parameters()))  # peaked: no near-ties
    ids = np.random.default_rng(n_draft).permutation(VOCAB)[:n_draft]
    drafter.draft_vocab_ids = mx.array(ids, dtype=mx.int32)
    drafter.save_pretrained(tmp_path / "reduced")
    rc, out, err = run_cli(
        capsys, "--drafter-path", tmp_path / "reduced", "--export-torch", tmp_path / "pt"
    )
    assert rc == 0, err
    assert f"draft vocabulary of {n_draft} tokens is expanded to the full {VOCAB}" in out
    exported = json.loads((tmp_path / "pt" / "config.json").read_text())
    new_exit = exit_dim + (2 if exit_dim + 1 == 2 * HIDDEN else 1)
    assert "draft_vocab_size" not in exported and exported["vocab_size"] == VOCAB
    assert exported["exit_dim"] == new_exit and exported["rnn"] is rnn

    torch, ref, embedding = torch_reference(VOCAB, HIDDEN, new_exit, layers, rnn)
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(tmp_path / "pt" / "model.safetensors")), strict=True)
    rc, _, err = run_cli(capsys, "--drafter-path", tmp_path / "pt", "--mlx-path", tmp_path / "back")
    assert rc == 0, err
    back = Drafter.from_pretrained(tmp_path / "back")
    embed = nn.Embedding(VOCAB, HIDDEN)
    embed.weight = mx.array(embedding.weight.detach().numpy())
    rng = np.random.default_rng(1)
    for width, length in [(4, 5), (1, 4), (min(n_draft, 10), 3)]:
        hidden = rng.standard_normal(HIDDEN).astype(np.float32)
        g0 = int(rng.integers(VOCAB))
        beams, log_probs = drafter.beam_search(mx.array(hidden), mx.array(g0), embed, width, length)
        beams = np.array(beams)
        assert set(beams[:, 1:].ravel()) <= set(ids.tolist())
        with torch.no_grad():
            ref_beams, ref_steps = ref.beam_search(
                torch.from_numpy(hidden), g0, embedding, width, length
            )
        assert np.array_equal(beams, ref_beams.numpy()), (width, length)
        # the draft tokens' log-probs are the reduced drafter's; all other tokens are impossible
        full = np.array(drafter.full_vocab_log_probs(log_probs))
        ref_steps = ref_steps.numpy()
        kept = np.isfinite(full) & (full > -1000)
        assert (kept == (ref_steps > -1000)).all()
        assert np.abs(full[kept] - ref_steps[kept]).max() < 1e-4
        back_beams, _ = back.beam_search(mx.array(hidden), mx.array(g0), embed, width, length)
        assert np.array_equal(np.array(back_beams), beams), (width, length)


# ------------------------------------------------------------------------------ base models
def test_hf_model_with_drafter(capsys, hf_dir, ref_drafter_dir, outdir):
    src, weights = hf_dir
    out = outdir / "model"
    rc, stdout, err = run_cli(
        capsys, "--hf-path", src, "--drafter-path", ref_drafter_dir, "--mlx-path", out
    )
    assert rc == 0, err
    assert "(with drafter/)" in stdout
    assert sorted(p.name for p in outdir.iterdir()) == ["model"]
    model, tokenizer, drafter = mlx_redrafter.load(out)
    assert drafter is not None and drafter.config.exit_dim == 96
    reference = mlx_lm_model(HF_CONFIG, weights)
    tokens = mx.array([[1, 5, 9, 33, 7, 100]])
    assert np.array_equal(np.array(model(tokens)), np.array(reference(tokens)))
    assert tokenizer.encode("t5 t9", add_special_tokens=False) == [5, 9]
    assert_same_weights(mlx_weights(out / "drafter"), mlx_weights(ref_drafter_dir))


def test_hf_model_torch_bin(capsys, tmp_path, outdir):
    pytest.importorskip("torch")
    weights = write_hf_model(tmp_path / "bin-llama", fmt="bin")
    rc, _, err = run_cli(capsys, "--hf-path", tmp_path / "bin-llama", "--mlx-path", outdir / "m")
    assert rc == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["m"]  # the restaging folder is gone
    model, _, drafter = mlx_redrafter.load(outdir / "m")
    assert drafter is None
    tokens = mx.array([[3, 4, 5]])
    reference = mlx_lm_model(HF_CONFIG, weights)
    assert np.array_equal(np.array(model(tokens)), np.array(reference(tokens)))


def test_hf_model_quantized(capsys, hf_dir, ref_drafter_dir, outdir):
    src, _ = hf_dir
    rc, _, err = run_cli(
        capsys, "--hf-path", src, "-q", "--q-group-size", "32", "--q-bits", "4",
        "--drafter-path", ref_drafter_dir, "--mlx-path", outdir / "q4",
    )  # fmt: skip
    assert rc == 0, err
    config = json.loads((outdir / "q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model, _, drafter = mlx_redrafter.load(outdir / "q4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert drafter is not None
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, VOCAB) and mx.isfinite(logits).all().item()


def test_requantizing_a_model_folder_keeps_its_drafter(capsys, hf_dir, ref_drafter_dir, outdir):
    """`--hf-path out/ -q` on an mlx_redrafter model folder carries its drafter/ over: read,
    cast like the base with --dtype (never quantized), checked and written, as --drafter-path."""
    src, _ = hf_dir
    rc, _, err = run_cli(
        capsys, "--hf-path", src, "--drafter-path", ref_drafter_dir, "--mlx-path", outdir / "m"
    )
    assert rc == 0, err
    rc, stdout, err = run_cli(
        capsys, "--hf-path", outdir / "m", "-q", "--q-group-size", "32", "--dtype", "float16",
        "--mlx-path", outdir / "q4",
    )  # fmt: skip
    assert rc == 0, err
    assert f"(with drafter/ from {outdir / 'm' / 'drafter'})" in stdout
    original = mlx_weights(outdir / "m" / "drafter")
    carried = mlx_weights(outdir / "q4" / "drafter")
    assert_same_weights(carried, {k: v.astype(mx.float16) for k, v in original.items()})
    model, _, drafter = mlx_redrafter.load(outdir / "q4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert drafter is not None and drafter.config.torch_dtype == "float16"
    # an explicit --drafter-path replaces the folder's own drafter
    write_reference_drafter(outdir / "other", seed=9, exit_dim=80)
    rc, stdout, err = run_cli(
        capsys, "--hf-path", outdir / "m", "--drafter-path", outdir / "other",
        "--mlx-path", outdir / "replaced",
    )  # fmt: skip
    assert rc == 0, err
    assert stdout.strip().endswith("(with drafter/)")
    assert_same_weights(mlx_weights(outdir / "replaced" / "drafter"), mlx_weights(outdir / "other"))


def test_add_drafter_to_existing_folder(capsys, hf_dir, ref_drafter_dir, outdir):
    src, _ = hf_dir
    assert run_cli(capsys, "--hf-path", src, "--mlx-path", outdir / "m")[0] == 0
    assert mlx_redrafter.load(outdir / "m")[2] is None
    rc, _, err = run_cli(
        capsys, "--drafter-path", ref_drafter_dir, "--add-drafter-to", outdir / "m"
    )
    assert rc == 0, err
    assert sorted(p.name for p in (outdir / "m").iterdir() if p.name.startswith(".")) == []
    assert mlx_redrafter.load(outdir / "m")[2] is not None
    expect_error(
        capsys,
        "--drafter-path", ref_drafter_dir, "--add-drafter-to", outdir / "m",
        match="drafter already exists (pass --force", outdir=outdir / "m",
    )  # fmt: skip
    other = outdir.parent / "other-drafter"
    write_reference_drafter(other, seed=7)
    rc, _, err = run_cli(
        capsys, "--drafter-path", other, "--add-drafter-to", outdir / "m", "--force"
    )
    assert rc == 0, err
    assert_same_weights(mlx_weights(outdir / "m" / "drafter"), mlx_weights(other))
    assert sorted(p.name for p in (outdir / "m").iterdir() if p.name.startswith(".")) == []
    # a model folder with drafter/ inside exports its drafter
    rc, _, err = run_cli(capsys, "--drafter-path", outdir / "m", "--export-torch", outdir / "pt")
    assert rc == 0, err
    assert_same_weights(mlx_weights(outdir / "pt"), mlx_weights(other))


@pytest.mark.slow
def test_gguf_cli_dequantized(capsys, outdir):
    from mlx_redrafter.default_model import DefaultModelMissingError, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except DefaultModelMissingError as e:
        pytest.skip(str(e))
    rc, _, err = run_cli(capsys, "--gguf", gguf, "--dequantize", "--mlx-path", outdir / "smol")
    assert rc == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["smol"]
    config = json.loads((outdir / "smol" / "config.json").read_text())
    assert config["rope_traditional"] is True and "quantization" not in config
    model, tokenizer, drafter = mlx_redrafter.load(outdir / "smol")
    assert drafter is None and model.model.embed_tokens.weight.dtype == mx.float32
    ids = tokenizer.encode("The capital of France is")
    assert model(mx.array([ids])).shape == (1, len(ids), 49152)


# ------------------------------------------------------------------------------ failures
def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, drop=(), add=None, reshape=None) -> None:
    weights = dict(mx.load(str(folder / "model.safetensors")))
    for key in drop:
        weights.pop(key)
    weights.update(add or {})
    for key, shape in (reshape or {}).items():
        weights[key] = mx.zeros(shape)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DRAFTER_FAILURES = {
    "unknown model_type": (
        lambda d: _edit_config(d, model_type="medusa"),
        "unknown model_type 'medusa' for a drafter",
    ),
    "missing key": (
        lambda d: _edit_weights(d, drop=["rnn_w.weight"]),
        "missing keys ['rnn_w.weight']",
    ),
    "extra key": (
        lambda d: _edit_weights(d, add={"lm_head.9.weight": mx.zeros((2, 2))}),
        "unexpected keys ['lm_head.9.weight']",
    ),
    "shape mismatch": (
        lambda d: _edit_weights(d, reshape={"lm_head.1.linear.weight": (96, 90)}),
        "lm_head.1.linear.weight has shape (96, 90), expected (96, 96)",
    ),
    "truncated weights": (
        lambda d: _truncate(d / "model.safetensors"),
        "(truncated or corrupt?)",
    ),
    "corrupt config": (
        lambda d: (d / "config.json").write_text('{"model_type": "recurrent_dr'),
        "config.json is not valid JSON (truncated or corrupt?)",
    ),
    "no weights": (
        lambda d: (d / "model.safetensors").unlink(),
        "has no weights (expected model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(DRAFTER_FAILURES))
def test_bad_drafter_fails_cleanly(capsys, tmp_path, outdir, case):
    corrupt, message = DRAFTER_FAILURES[case]
    src = tmp_path / "drafter"
    write_reference_drafter(src)
    corrupt(src)
    expect_error(
        capsys, "--drafter-path", src, "--mlx-path", outdir / "m", match=message, outdir=outdir
    )


def test_bad_torch_bin_drafter(capsys, tmp_path, outdir, monkeypatch):
    torch, ref, _ = torch_reference(VOCAB, HIDDEN, 96, 2, True)
    src = tmp_path / "bin-drafter"
    save_torch_drafter(torch, ref, src, "bin", reference_config())
    _truncate(src / "pytorch_model.bin")
    expect_error(
        capsys, "--drafter-path", src, "--mlx-path", outdir / "m",
        match="pytorch_model.bin (truncated or corrupt?)", outdir=outdir,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    expect_error(
        capsys, "--drafter-path", src, "--mlx-path", outdir / "m",
        match="is a PyTorch pickle (.bin), which needs torch to read", outdir=outdir,
    )  # fmt: skip


def _hf_with(folder: Path, config=None, drop=(), reshape=None, truncate=False) -> Path:
    config = dict(HF_CONFIG, **(config or {}))
    weights = make_llama_weights(HF_CONFIG)
    for key in drop:
        weights.pop(key)
    for key, shape in (reshape or {}).items():
        weights[key] = np.zeros(shape, np.float32)
    write_hf_model(folder, config, weights)
    if truncate:
        _truncate(folder / "model.safetensors")
    return folder


HF_FAILURES = {
    "unknown model_type": (
        dict(config={"model_type": "not_a_model"}),
        "unknown model_type 'not_a_model' (mlx-lm has no such architecture)",
    ),
    "unsupported model_type": (
        dict(config={"model_type": "phi3"}),
        "model_type 'phi3' is not supported by mlx_redrafter",
    ),
    "missing key": (dict(drop=["model.norm.weight"]), "Missing 1 parameters: model.norm.weight"),
    "shape mismatch": (
        dict(reshape={"model.layers.1.mlp.up_proj.weight": (96, 32)}),
        "Expected shape (96, 64) but received shape (96, 32) for parameter "
        "model.layers.1.mlp.up_proj.weight",
    ),
    "truncated weights": (dict(truncate=True), "corrupt file"),
}


@pytest.mark.parametrize("case", list(HF_FAILURES))
def test_bad_hf_model_fails_cleanly(capsys, tmp_path, outdir, case):
    kwargs, message = HF_FAILURES[case]
    src = _hf_with(tmp_path / "hf", **kwargs)
    expect_error(capsys, "--hf-path", src, "--mlx-path", outdir / "m", match=message, outdir=outdir)


def test_drafter_must_fit_the_base_model(capsys, tmp_path, hf_dir, outdir):
    src, _ = hf_dir
    write_reference_drafter(tmp_path / "v100", vocab=100)
    # the base model is converted first and checked against the drafter: nothing remains
    expect_error(
        capsys, "--hf-path", src, "--drafter-path", tmp_path / "v100", "--mlx-path", outdir / "m",
        match="drafter vocab_size 100 does not match the model's vocabulary of 128 tokens",
        outdir=outdir,
    )  # fmt: skip
    assert run_cli(capsys, "--hf-path", src, "--mlx-path", outdir / "m")[0] == 0
    write_reference_drafter(tmp_path / "h32", hidden=32, exit_dim=64)
    expect_error(
        capsys, "--drafter-path", tmp_path / "h32", "--add-drafter-to", outdir / "m",
        match="drafter hidden_size 32 does not match the model's hidden size 64",
        outdir=outdir / "m",
    )  # fmt: skip


def test_existing_output_is_refused_then_replaced_with_force(capsys, ref_drafter_dir, outdir):
    out = outdir / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(
        capsys, "--drafter-path", ref_drafter_dir, "--mlx-path", out,
        match="m already exists (pass --force to replace it)", outdir=outdir,
    )  # fmt: skip
    assert (out / "keep.txt").read_text() == "mine"
    expect_error(
        capsys, "--drafter-path", ref_drafter_dir, "--export-torch", out,
        match="already exists", outdir=outdir,
    )  # fmt: skip
    rc, _, err = run_cli(capsys, "--drafter-path", ref_drafter_dir, "--mlx-path", out, "--force")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in outdir.iterdir()) == ["m"]


def test_failure_removes_the_folders_it_created(capsys, tmp_path, hf_dir, outdir):
    write_reference_drafter(tmp_path / "v100", vocab=100)  # found unfit after the base is written
    expect_error(
        capsys, "--hf-path", hf_dir[0], "--drafter-path", tmp_path / "v100",
        "--mlx-path", outdir / "new" / "deeper" / "m",
        match="drafter vocab_size 100 does not match", outdir=outdir,
    )  # fmt: skip


def test_ctrl_c_prints_one_line_and_leaves_nothing_behind(
    capsys, monkeypatch, hf_dir, ref_drafter_dir, outdir
):
    """Ctrl-C once the base model is written (checking the drafter against it, the last step)."""
    from mlx_redrafter.convert import jobs

    reached = []

    def interrupt(drafter, model_dir):
        reached.append(sorted(p.name for p in Path(model_dir).iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "check_against_model", interrupt)
    rc, out, err = run_cli(
        capsys, "--hf-path", hf_dir[0], "--drafter-path", ref_drafter_dir,
        "--mlx-path", outdir / "new" / "m",
    )  # fmt: skip
    assert rc == 130
    assert err == "mlx_redrafter.convert: interrupted\n" and out == ""
    assert reached and "config.json" in reached[0]  # there was a half-written output to remove
    assert list(outdir.iterdir()) == []  # no output, no hidden work folder, no new parent


def test_bad_gguf_fails_cleanly(capsys, tmp_path, outdir):
    import struct

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(60))
    expect_error(
        capsys, "--gguf", not_gguf, "--mlx-path", outdir / "m",
        match="not a GGUF file (bad magic", outdir=outdir,
    )  # fmt: skip
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 1000))
    expect_error(
        capsys, "--gguf", truncated, "--mlx-path", outdir / "m",
        match="truncated or corrupt GGUF file", outdir=outdir,
    )  # fmt: skip
    expect_error(
        capsys, "--gguf", tmp_path / "absent.gguf", "--mlx-path", outdir / "m",
        match="absent.gguf does not exist", outdir=outdir,
    )  # fmt: skip


ARGUMENT_FAILURES = [
    (["--mlx-path", "{out}"], "--mlx-path needs --hf-path, --gguf or --drafter-path"),
    (["--gguf", "x.gguf", "-q", "--mlx-path", "{out}"], "-q/--quantize applies to --hf-path only"),
    (["--hf-path", "{hf}", "--q-bits", "4", "--mlx-path", "{out}"], "--q-bits/--q-group-size need"),
    (["--hf-path", "{hf}", "--dequantize", "--mlx-path", "{out}"], "--dequantize applies to"),
    (["--export-torch", "{out}"], "--export-torch needs --drafter-path"),
    (["--hf-path", "{hf}", "--drafter-path", "{hf}", "--add-drafter-to", "{hf}"], "drafter only"),
    (["--hf-path", "{hf}", "--mlx-path", "{hf}/inside", "--force"], "overlaps the input"),
    (["--hf-path", "{hf}", "--gguf", "x.gguf", "--mlx-path", "{out}"], "not allowed with"),
    (["--hf-path", "{hf}"], "one of the arguments --mlx-path --add-drafter-to --export-torch"),
]


@pytest.mark.parametrize("argv,message", ARGUMENT_FAILURES)
def test_bad_arguments(capsys, hf_dir, outdir, argv, message):
    fill = {"out": outdir / "m", "hf": hf_dir[0]}
    argv = [a.format(**fill) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert list(outdir.iterdir()) == []
    assert sorted(p.name for p in hf_dir[0].iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------ hub ids
def test_hub_id_offline_is_a_clear_error(capsys, outdir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        mlx_redrafter.load("no-such-org-xyz/no-such-model")
    message = str(info.value)
    assert "'no-such-org-xyz/no-such-model'" in message and "HF_HUB_OFFLINE is set" in message
    assert "mlx_redrafter.convert --hf-path DIR" in message
    expect_error(
        capsys, "--hf-path", "no-such-org-xyz/no-such-model", "--mlx-path", outdir / "m",
        match="not in the local Hugging Face cache", outdir=outdir,
    )  # fmt: skip


def test_hub_id_resolves_through_snapshot_download(monkeypatch, hf_dir, ref_drafter_dir, outdir):
    import huggingface_hub

    calls = []
    repos = {"org/tiny-llama": hf_dir[0], "org/tiny-drafter": ref_drafter_dir}

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, tuple(allow_patterns or ())))
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _, drafter = mlx_redrafter.load("org/tiny-llama", drafter_path="org/tiny-drafter")
    assert drafter is not None and [c[0] for c in calls] == ["org/tiny-llama", "org/tiny-drafter"]
    assert "drafter/*" in calls[0][1]
    rc = cli.main(
        ["--hf-path", "org/tiny-llama", "--drafter-path", "org/tiny-drafter"]
        + ["--mlx-path", str(outdir / "m"), "--no-progress"]
    )
    assert rc == 0 and (outdir / "m" / "config.json").is_file()
    assert (outdir / "m" / "drafter" / "model.safetensors").is_file()
    # the engine and the converter fetch a drafter repo with the same patterns
    drafter_calls = {patterns for repo, patterns in calls if repo == "org/tiny-drafter"}
    assert drafter_calls == {DRAFTER_PATTERNS}


# ------------------------------------------------------------------------------ entry points
def test_python_dash_m_mlx_redrafter_convert_from_any_folder(tmp_path):
    """The installed name runs from any folder; it is the converter's only name (a top-level
    `convert` would load every module a second time, beside `mlx_redrafter.convert`)."""
    result = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.convert", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mlx_redrafter.convert")
    for flag in ("--hf-path", "--drafter-path", "--gguf", "--mlx-path", "--add-drafter-to"):
        assert flag in result.stdout
    assert "--export-torch" in result.stdout and "--dequantize" in result.stdout


def test_packaging_lists_every_package_and_maps_convert():
    """pyproject lists packages by hand (a renamed folder defeats `packages.find`)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    assert setuptools["package-dir"]["mlx_redrafter.convert"] == "convert"
    assert "convert" not in packages and "mlx_redrafter.convert" in packages
    on_disk = {
        ".".join(folder.relative_to(ROOT).parts)
        for folder in [ROOT / "mlx_redrafter", *(ROOT / "mlx_redrafter").rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    }
    assert on_disk <= packages, f"add {sorted(on_disk - packages)} to pyproject's packages"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mlx_redrafter.convert"] == "mlx_redrafter.convert.cli:main"
