"""Exact sampling (`accept="exact"`): generated tokens are distributed as the LLM's own sampling.

1. Enumeration, float64, written from the rule's statement (not from the implementation): over
   random target distributions and candidate trees on an 8-token vocabulary, every outcome of
   the acceptance walk with its probability; the law of the next 1, 2 and 3 generated tokens
   equals autoregressive sampling to 1e-9.
2. Probes: the implementation's walk, driven by injected uniforms, takes the path and count the
   rule prescribes, children tried in drafter-score order with acceptance intervals of length
   p(x) (so it realizes the enumerated probabilities), and never corrects to a rejected child.
3. Statistics: seeded engine runs on a tiny vocabulary-16 model against the exact
   autoregressive law of the first two tokens after a fixed context, for a few temperatures
   and top-p values, with an oracle-like drafter and a random one. Monte Carlo chi-square
   test at false-alarm rate ALPHA per check; the seeds are fixed, so the tests are
   deterministic.
4. The same test rejects the reference rule where it is biased: it has teeth.
5. top_k=1 sampling through the exact rule equals greedy decoding.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import _get_classes

from mlx_redrafter import generate_step
from mlx_redrafter.accept import exact_accept_from_uniforms
from mlx_redrafter.benchmarks.tiny import (
    CONFIGS,
    VOCAB,
    OracleDrafter,
    make_drafter,
    make_model,
    reference_greedy,
)
from mlx_redrafter.drafter import DrafterConfig
from mlx_redrafter.generate import setup_arg_parser
from mlx_redrafter.sampling import SamplingParams, target_log_probs
from mlx_redrafter.tree import pack_tree

SMALL_VOCAB = 8


# ---------------------------------------------------------------------------- 1. enumeration
class TargetTable:
    """p(. | context) for every context: random rows, some with zeros (filtered tokens), some
    one-hot, fixed by (seed, context)."""

    def __init__(self, seed: int, vocab: int = SMALL_VOCAB):
        self.seed, self.vocab, self.rows = seed, vocab, {}

    def __call__(self, context: tuple[int, ...]) -> np.ndarray:
        if context not in self.rows:
            rng = np.random.default_rng([self.seed, 7, *context])
            p = rng.dirichlet(np.full(self.vocab, 0.6))
            kind = rng.random()
            if kind < 0.4:  # filtered: only some tokens survive
                p[rng.random(self.vocab) < 0.5] = 0.0
                if p.sum() == 0:
                    p[rng.integers(self.vocab)] = 1.0
            elif kind < 0.5:  # top_k=1-like
                p = np.eye(self.vocab)[rng.integers(self.vocab)]
            self.rows[context] = p / p.sum()
        return self.rows[context]


def random_beams(seed: int, context: tuple[int, ...], target: TargetTable) -> np.ndarray:
    """W beams of L tokens from g0 = context[-1]: likely tokens (drawn from the target, so
    acceptance happens), repeats (shared prefixes) and arbitrary tokens (rejections)."""
    rng = np.random.default_rng([seed, 11, *context])
    width, length = int(rng.integers(1, 5)), int(rng.integers(2, 5))
    beams = np.zeros((width, length), dtype=np.int32)
    beams[:, 0] = context[-1]
    for b in range(width):
        for j in range(1, length):
            if b > 0 and rng.random() < 0.4:
                beams[b, j] = beams[rng.integers(b), j]  # often continues a shared prefix
            elif rng.random() < 0.6:
                p = target(context + tuple(beams[b, 1:j].tolist()))
                beams[b, j] = rng.choice(target.vocab, p=p)
            else:
                beams[b, j] = rng.integers(target.vocab)
    return beams


def children_of(beams: np.ndarray) -> dict[tuple[int, ...], list[int]]:
    """Tree path (drafted tokens after g0) -> its distinct child tokens, first beam first.
    A negative token (`tree.PAD`) ends a shorter branch."""
    children: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for beam in beams.tolist():
        for j in range(1, len(beam)):
            if beam[j] < 0:
                break
            kids = children[tuple(beam[1:j])]
            if beam[j] not in kids:
                kids.append(beam[j])
    return children


def walk_outcomes(target, context, children) -> dict[tuple[int, ...], float]:
    """Every outcome of the rule's walk (emitted tokens: accepted path + next) -> probability.

    At a node: try the children in order, accepting x with probability r(x) / sum(r), r the
    residual; a rejection zeroes r(x). Accepted: recurse into the child. No child accepted:
    the next token is drawn from r / sum(r).
    """
    out: dict[tuple[int, ...], float] = defaultdict(float)

    def visit(path, reach):
        r = target(context + path).copy()
        for x in children.get(path, []):
            mass = r.sum()
            if reach <= 0 or mass <= 0:
                return
            accept = r[x] / mass
            if accept > 0:
                visit(path + (x,), reach * accept)
            reach *= 1.0 - accept
            r[x] = 0.0
        mass = r.sum()
        if reach <= 0 or mass <= 0:
            return
        for y in np.flatnonzero(r):
            out[path + (int(y),)] += reach * r[y] / mass

    visit((), 1.0)
    return out


def generated_law(target, draft, context, m) -> dict[tuple[int, ...], float]:
    """Law of the next m generated tokens: steps (draft a tree, walk it) until m are out."""
    law: dict[tuple[int, ...], float] = defaultdict(float)
    for tokens, prob in walk_outcomes(target, context, children_of(draft(context))).items():
        if len(tokens) >= m:
            law[tokens[:m]] += prob
        else:
            rest = generated_law(target, draft, context + tokens, m - len(tokens))
            for more, q in rest.items():
                law[tokens + more] += prob * q
    return law


def autoregressive_law(target, context, m) -> dict[tuple[int, ...], float]:
    law = {(): 1.0}
    for _ in range(m):
        longer = {}
        for seq, prob in law.items():
            p = target(context + seq)
            for y in np.flatnonzero(p):
                longer[seq + (int(y),)] = prob * p[y]
        law = longer
    return law


def max_difference(a: dict, b: dict) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("case", range(40))
def test_enumerated_walk_is_autoregressive_sampling(case):
    target = TargetTable(seed=case)
    context = (int(case % SMALL_VOCAB),)
    draft = functools.partial(random_beams, case, target=target)
    for m in (1, 2, 3):
        law = generated_law(target, draft, context, m)
        assert abs(sum(law.values()) - 1.0) < 1e-9
        assert max_difference(law, autoregressive_law(target, context, m)) < 1e-9, m


@pytest.mark.parametrize("case", range(40))
def test_walk_accepts_each_tree_path_as_often_as_sampling_begins_with_it(case):
    """The best an exact rule can do: a tree node is accepted with its path's probability."""
    target = TargetTable(seed=case)
    context = (3,)
    children = children_of(random_beams(case, context, target))
    outcomes = walk_outcomes(target, context, children)
    nodes = {path + (x,) for path, kids in children.items() for x in kids}
    for node in nodes:
        accepted = sum(
            p for out, p in outcomes.items() if out[: len(node)] == node and len(out) > len(node)
        )
        expected = np.prod([target(context + node[:d])[node[d]] for d in range(len(node))])
        assert abs(accepted - expected) < 1e-12


# ---------------------------------------------------------------------------- 2. probes
def node_of(beams: np.ndarray, tree, path: tuple[int, ...]) -> tuple[int, int]:
    """(first beam holding g0 + path, packed index of the path's last node)."""
    for b, beam in enumerate(beams.tolist()):
        if tuple(beam[1 : len(path) + 1]) == path:
            return b, int(tree.unpacker[b, len(path)])
    raise AssertionError(path)


@pytest.mark.parametrize("case", range(25))
def test_injected_uniforms_drive_the_walk_the_rule_prescribes(case):
    target = TargetTable(seed=100 + case)
    context = (int(case % SMALL_VOCAB),)
    beams = random_beams(case, context, target)
    tree = pack_tree(beams)
    children = children_of(beams)
    ends = [()] + [path + (x,) for path, kids in children.items() for x in kids]
    rows = np.stack(
        [target(context + tuple(beams[b, 1 : d + 1].tolist())) for b, d in _node_owner(tree)]
    )
    with np.errstate(divide="ignore"):
        log_p = mx.array(np.log(rows).astype(np.float32))
    rng = np.random.default_rng(case)
    for end in ends:  # every node as the end of the accepted path
        intervals = []  # (node, [low, high) of u there)
        for d in range(len(end) + 1):
            path = end[:d]
            p = target(context + path)
            kids = children.get(path, [])
            if d < len(end):  # accept the path's child: u in [S_{j-1}, S_j)
                j = kids.index(end[d])
                low, high = p[kids[:j]].sum(), p[kids[: j + 1]].sum()
            else:  # reject every child: u in [S_k, 1)
                low, high = p[kids].sum(), 1.0
            intervals.append((node_of(beams, tree, path)[1], low, high))
        if min(high - low for _, low, high in intervals) < 1e-4:
            continue  # (next to) no probability: float32 cannot place u inside
        for probe in ("middle", "low", "high"):
            u = rng.random(tree.size)  # nodes off the path: anything
            for node, low, high in intervals:
                u[node] = {"middle": (low + high) / 2, "low": low + 2e-5, "high": high - 2e-5}[
                    probe
                ]
            best, accepted, nxt = exact_accept_from_uniforms(
                tree, log_p, mx.array(u.astype(np.float32)), mx.random.key(case)
            ).to_host()
            assert accepted == len(end), (end, probe)
            assert best == node_of(beams, tree, end)[0]  # the best-scored beam holding it
            stop = target(context + end)
            assert nxt not in children.get(end, []) and stop[nxt] > 0, (end, nxt)


def _node_owner(tree) -> list[tuple[int, int]]:
    length = tree.unpacker.shape[1]
    return [(int(i) // length, int(i) % length) for i in tree.flat_indices]


def test_residual_draw_covers_the_non_children_only():
    """The correction after rejecting every child is drawn from the residual: over many keys
    it hits every non-child token with mass and never a child."""
    beams = np.array([[0, 1, 2], [0, 3, 1], [0, 1, 4]], dtype=np.int32)
    tree = pack_tree(beams)
    p = np.full((tree.size, SMALL_VOCAB), 1.0 / SMALL_VOCAB)
    log_p = mx.array(np.log(p).astype(np.float32))
    u = mx.full((tree.size,), 0.999)  # reject at the root
    seen = {
        exact_accept_from_uniforms(tree, log_p, u, mx.random.key(k)).to_host()[2]
        for k in range(200)
    }
    assert seen == set(range(SMALL_VOCAB)) - {1, 3}


# ---------------------------------------------------------------------------- 3. statistics
ALPHA = 1e-3  # false-alarm rate of each statistical check
RUNS = 2000
PROMPT = [2, 11, 4]
FORCED = 6  # the first generated token; the checked tokens follow it
WIDTH, LENGTH = 4, 3


@functools.cache
def small_model():
    """A tiny llama with a 16-token vocabulary (mlx_redrafter.benchmarks.tiny's config, smaller)."""
    config = dict(
        CONFIGS["llama"], vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    model_class, args_class = _get_classes(config)
    mx.random.seed(1)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def forcing_first(prompt: list[int]):
    """Logits processor fixing the context: the first generated token after `prompt` is FORCED
    (the same in the engine and in the autoregressive law, as every processor is)."""

    def force_first(history: mx.array, logits: mx.array) -> mx.array:
        if history.size != len(prompt):
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == FORCED, logits, -mx.inf)

    return force_first


def probs(logits: mx.array, params: SamplingParams) -> np.ndarray:
    p = np.array(mx.exp(target_log_probs(logits, params)), dtype=np.float64)
    return p / p.sum(axis=-1, keepdims=True)


def autoregressive_first_two(model, params: SamplingParams, prompt=PROMPT) -> np.ndarray:
    """Exact P(t2, t3) after prompt + [FORCED] under plain autoregressive sampling."""
    context = prompt + [FORCED]
    vocab = 16
    first = probs(model(mx.array(context)[None])[0, -1], params)
    batch = mx.array([context + [t] for t in range(vocab)])
    second = probs(model(batch)[:, -1], params)
    return first[:, None] * second


class TopTokenDrafter:
    """Oracle-like: the first tree (after FORCED) is built from the model's own likeliest
    tokens (shared prefixes, a tie-free score order); later trees are random tokens. Its
    draft distribution q is uniform, far from p: the reference rule then over-accepts."""

    def __init__(self, model, vocab: int = 16):
        context = PROMPT + [FORCED]
        first = np.array(mx.softmax(model(mx.array(context)[None])[0, -1]))
        a = np.argsort(-first)[:3].tolist()
        second = np.array(mx.softmax(model(mx.array([context + [t] for t in a]))[:, -1], -1))
        b = [np.argsort(-row)[:2].tolist() for row in second]
        self.first_tree = np.array(
            [[FORCED, a[0], b[0][0]], [FORCED, a[0], b[0][1]], [FORCED, a[1], b[1][0]]]
            + [[FORCED, a[2], b[2][0]]],
            dtype=np.int32,
        )
        self.vocab = vocab
        self.config = DrafterConfig(vocab_size=vocab, hidden_size=32)
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.calls, self.rng = 0, np.random.default_rng(seed)

    def full_vocab_log_probs(self, log_probs):
        return log_probs

    def beam_search(self, hidden, first_token, embed_tokens, beam_width, beam_length):
        g0 = int(first_token.item())
        if self.calls == 0 and g0 == FORCED:
            beams = self.first_tree
        else:
            beams = self.rng.integers(0, self.vocab, size=(beam_width, beam_length))
            beams[:, 0] = g0
        self.calls += 1
        uniform = mx.full((beam_width, beam_length - 1, self.vocab), -float(np.log(self.vocab)))
        return mx.array(beams.astype(np.int32)), uniform


def sample_first_two(
    model, drafter, params: SamplingParams, accept: str, seed0: int, runs=RUNS, prompt=PROMPT, **kw
):
    """Counts (16, 16) of (t2, t3) over seeded engine runs; also the mean accepted count
    (`kw` goes to generate_step, e.g. prompt_lookup; a list `lookup_accepted` in it collects
    each second step's lookup-accepted count)."""
    counts = np.zeros((16, 16), dtype=np.int64)
    accepted = 0
    lookup_log = kw.pop("lookup_accepted", None)
    for run in range(runs):
        if isinstance(drafter, TopTokenDrafter):
            drafter.reset(run)
        tokens, steps = [], []
        for new, stats in generate_step(
            mx.array(prompt),
            model,
            drafter,
            max_tokens=3,
            temp=params.temp,
            top_p=params.top_p,
            logits_processors=[forcing_first(prompt)],
            beam_width=WIDTH,
            beam_length=LENGTH,
            seed=seed0 + run,
            accept=accept,
            **kw,
        ):
            tokens += new
            steps.append(stats)
        assert tokens[0] == FORCED and len(tokens) == 3
        counts[tokens[1], tokens[2]] += 1
        accepted += steps[1].accepted
        if lookup_log is not None:
            lookup_log.append(steps[1].lookup_accepted)
    return counts, accepted / runs


def chi_square_pvalue(counts: np.ndarray, p: np.ndarray, reps: int = 20000) -> float:
    """Monte Carlo p-value of Pearson's chi-square statistic, cells with expected count < 5
    pooled into one; the null distribution is simulated from the exact law (fixed seed), so
    small cells need no asymptotics. 0 if a cell of probability 0 was observed."""
    counts, p = counts.reshape(-1), p.reshape(-1) / p.sum()
    if counts[p == 0].any():
        return 0.0
    n = counts.sum()
    small = n * p < 5

    def pooled(c):
        return np.concatenate([c[..., ~small], c[..., small].sum(axis=-1, keepdims=True)], -1)

    expected = pooled(n * p)
    keep = expected > 0

    def statistic(c):
        return (((pooled(c) - expected)[..., keep] ** 2) / expected[keep]).sum(axis=-1)

    null = statistic(np.random.default_rng(0).multinomial(n, p, size=reps))
    return float((1 + (null >= statistic(counts)).sum()) / (1 + reps))


def check_against_autoregressive(counts, exact) -> tuple[float, float, float]:
    """(p-value of t2, p-value of (t2, t3), total-variation distance of (t2, t3))."""
    first = chi_square_pvalue(counts.sum(axis=1), exact.sum(axis=1))
    joint = chi_square_pvalue(counts, exact)
    tv = 0.5 * np.abs(counts / counts.sum() - exact).sum()
    return first, joint, tv


@pytest.mark.parametrize(
    "drafter_kind, temp, top_p, seed0, runs",
    [
        ("oracle", 1.0, 0.0, 10_000, RUNS),
        ("oracle", 0.7, 0.9, 20_000, RUNS),
        # the real drafter's beam search and its short acceptances (often two steps per run)
        # make a run ~3x slower
        ("random", 1.5, 0.8, 30_000, 1200),
    ],
)
def test_exact_rule_matches_autoregressive_sampling(drafter_kind, temp, top_p, seed0, runs):
    model = small_model()
    params = SamplingParams(temp=temp, top_p=top_p)
    drafter = TopTokenDrafter(model) if drafter_kind == "oracle" else make_drafter(model)
    counts, mean_accepted = sample_first_two(model, drafter, params, "exact", seed0, runs)
    first, joint, tv = check_against_autoregressive(counts, autoregressive_first_two(model, params))
    assert first >= ALPHA and joint >= ALPHA, (first, joint, tv)
    if drafter_kind == "oracle":
        assert mean_accepted > 0.3  # the tree was really walked, not just corrected at the root


def test_match_rule_matches_autoregressive_sampling_and_accepts_like_the_exact_rule():
    """mlx-lm's rule on the tree is exact too, and for a fixed tree takes each child with
    probability p(x), as the exact walk does: equal acceptance in expectation."""
    model = small_model()
    params = SamplingParams(temp=1.0)
    counts, accepted = sample_first_two(model, TopTokenDrafter(model), params, "match", 50_000)
    first, joint, tv = check_against_autoregressive(counts, autoregressive_first_two(model, params))
    assert first >= ALPHA and joint >= ALPHA, (first, joint, tv)
    _, exact_accepted = sample_first_two(model, TopTokenDrafter(model), params, "exact", 60_000)
    assert accepted > 0.3 and abs(accepted - exact_accepted) < 0.15, (accepted, exact_accepted)


# ---------------------------------------------------------------------------- 4. teeth
def test_the_same_check_rejects_the_biased_reference_rule():
    """Uniform q and candidates that are p's likeliest tokens: the reference keeps x whenever
    p(x) > q(x) = 1/16, so the best-scored candidate nearly always wins (500 runs are plenty)."""
    model = small_model()
    params = SamplingParams(temp=1.0)
    drafter = TopTokenDrafter(model)
    counts, _ = sample_first_two(model, drafter, params, "reference", 40_000, runs=500)
    first, joint, tv = check_against_autoregressive(counts, autoregressive_first_two(model, params))
    assert first < ALPHA and joint < ALPHA and tv > 0.2, (first, joint, tv)


# ---------------------------------------------------------------------------- 5. and the rest
def tokens_of(model, drafter, prompt, **kw):
    return [t for toks, _ in generate_step(mx.array(prompt), model, drafter, **kw) for t in toks]


def test_top_k_one_sampling_is_greedy_through_the_exact_rule():
    model = make_model("llama")
    prompt = [5, 17, 33, 2, 9]
    expected = reference_greedy(model, prompt, 30)
    for seed in range(2):
        for drafter in (
            make_drafter(model, seed=seed),
            OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=seed),
        ):
            got = tokens_of(
                model, drafter, prompt, max_tokens=30, temp=0.8, top_k=1, seed=seed, accept="exact"
            )
            assert got == expected


def test_exact_rule_is_the_default_reproducible_and_plain_without_drafter():
    model = small_model()
    drafter = make_drafter(model)
    kw = dict(max_tokens=20, temp=1.0, top_p=0.95)
    runs = [tokens_of(model, drafter, PROMPT, seed=s, **kw) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    assert tokens_of(model, drafter, PROMPT, seed=1, accept="exact", **kw) == runs[0]
    # without a drafter both rules are the same plain draw from p
    plain = [tokens_of(model, None, PROMPT, seed=3, accept=a, **kw) for a in ("exact", "reference")]
    assert plain[0] == plain[1]
    with pytest.raises(ValueError, match="acceptance rule"):
        tokens_of(model, drafter, PROMPT, seed=1, accept="typical", **kw)


def test_cli_accept_flag():
    assert setup_arg_parser().parse_args([]).accept == "exact"
    assert setup_arg_parser().parse_args(["--accept", "reference"]).accept == "reference"
    with pytest.raises(SystemExit):
        setup_arg_parser().parse_args(["--accept", "typical"])
