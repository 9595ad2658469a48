"""ring_attention under torch.compile (`ringmem.compiled`): one custom op, no graph break,
compiled equal to eager within a same-dtype baseline, forward and backward, every schedule,
on gloo ranks; recompiles counted by torch's own tools."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringmem
from ringmem.links import INTERCONNECTS
from ringmem.testing import spawn

SCHEDULES = ("kv", "q", "allgather")


class Block(torch.nn.Module):
    """A transformer block's attention half: projections, ring attention, output, residual."""

    def __init__(self, dim: int, hq: int, hkv: int, hd: int, **attn) -> None:
        super().__init__()
        self.hq, self.hkv, self.hd, self.attn = hq, hkv, hd, attn
        self.qkv = torch.nn.Linear(dim, (hq + 2 * hkv) * hd)
        self.o = torch.nn.Linear(hq * hd, dim)
        self.sinks = torch.nn.Parameter(torch.zeros(hq)) if attn.pop("sinks", False) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(torch.nn.functional.rms_norm(x, (x.shape[-1],))).split(
            [self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        q, k, v = (t.reshape(b, s, -1, self.hd) for t in (q, k, v))
        a = ringmem.ring_attention(q, k, v, sinks=self.sinks, **self.attn)
        return x + self.o(a.reshape(b, s, -1))


def _grads(block: Block, fn, x: torch.Tensor) -> list[torch.Tensor]:
    block.zero_grad()
    xl = x.detach().clone().requires_grad_()
    out = fn(xl)
    out.square().sum().backward()
    return [out.detach(), xl.grad] + [p.grad.clone() for p in block.parameters()]


CASES = [  # (attention options, backend): every schedule through inductor
    (dict(schedule="kv"), "inductor"),
    (dict(schedule="q"), "inductor"),
    (dict(schedule="allgather"), "inductor"),
    # documents with sinks and MQA; a window with a softcap; non-causal: the op's
    # fake and autograd without inductor's codegen (same op, cheaper to compile)
    (dict(schedule="q", cu_seqlens=[0, 5, 17, 24], layout="document", sinks=True,
          heads=(4, 1)), "aot_eager"),
    (dict(schedule="kv", window=(5, 0), softcap=3.0, layout="contiguous"), "aot_eager"),
    (dict(schedule="allgather", causal=False), "aot_eager"),
    # Ulysses over the whole group (u = world; 2 K/V heads: replicated at u = 3, their
    # gradients summed), with sinks; then over packed documents with a window
    (dict(schedule="kv", ulysses="world", heads=(6, 2), sinks=True), "aot_eager"),
    (dict(schedule="q", ulysses="world", heads=(6, 2), cu_seqlens=[0, 5, 17, 24],
          window=(6, 0)), "aot_eager"),
]


def _compiled_equals_eager(rank: int, world: int, cases: list = CASES) -> None:
    torch.manual_seed(0)
    for opts, backend in cases:
        opts = dict(opts)
        hq, hkv = opts.pop("heads", (4, 2))
        if opts.get("ulysses") == "world":
            opts["ulysses"] = world
        s, dim, hd = 8 * world, 16, 8
        if "cu_seqlens" in opts:
            opts["cu_seqlens"] = [0, 5, 3 * world + 2, s]
        layout = opts.get("layout", "zigzag")
        shard_kw = dict(layout=layout, cu_seqlens=opts.get("cu_seqlens"))
        ref64 = Block(dim, hq, hkv, hd, **opts).double()
        block = Block(dim, hq, hkv, hd, **opts)
        block.load_state_dict({k: v.float() for k, v in ref64.state_dict().items()})
        x64 = torch.randn(1, s, dim, dtype=torch.float64, generator=torch.Generator()
                          .manual_seed(1))
        x64l = ringmem.shard(x64, **shard_kw)
        truth = _grads(ref64, ref64, x64l)
        eager = _grads(block, block, x64l.float())
        torch._dynamo.reset()
        comp = _grads(block, torch.compile(block, backend=backend, fullgraph=True),
                      x64l.float())
        for name, t, e, c in zip(["out", "dx"] + [n for n, _ in block.named_parameters()],
                                 truth, eager, comp):
            base = (e.double() - t).abs().max().item()
            err = (c.double() - t).abs().max().item()
            assert err <= 4 * base + 1e-6, (opts, backend, name, err, base)


@pytest.mark.parametrize("world", [2, 3])
def test_compiled_equals_eager_every_schedule(world: int) -> None:
    spawn(_compiled_equals_eager, world, timeout=900)


def test_compiled_ulysses_times_ring_at_world_4() -> None:
    # Ulysses groups of 2 x a ring of 2, and the degree the cost model picks ("auto")
    cases = [(dict(schedule="kv", ulysses=2, heads=(4, 2), sinks=True), "aot_eager"),
             (dict(schedule="auto", ulysses="auto", heads=(4, 2), cu_seqlens=[0, 5, 17, 24]),
              "aot_eager")]
    spawn(_compiled_equals_eager, 4, cases, timeout=900)


def _no_breaks_one_compile_per_shape(rank: int, world: int) -> None:
    from torch._dynamo.testing import CompileCounter
    block = Block(16, 4, 2, 8, schedule="auto")
    x = torch.randn(1, 8, 16)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained
    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(block, backend=counter, fullgraph=True, dynamic=False)
    for s in (8, 8, 16, 8, 16, 24):
        f(torch.randn(1, s, 16)).sum().backward()
    assert counter.frame_count == 3, counter.frame_count  # one per distinct shape
    # the agreement still runs inside the op: a rank with another shape is named
    torch._dynamo.reset()
    f = torch.compile(block, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="q.shape"):
        f(torch.randn(1, 8 if rank else 16, 16))
    dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_no_graph_break_and_one_compile_per_shape(world: int) -> None:
    spawn(_no_breaks_one_compile_per_shape, world, timeout=600)


def test_what_the_op_cannot_carry_is_refused_by_name() -> None:
    q = torch.randn(1, 8, 2, 4)
    for kw, match in ((dict(ulysses=0), "ulysses must be an int degree >= 1 or 'auto', "
                                        "got 0"), (dict(mesh=(None, None)), "mesh"),
                      (dict(stats=ringmem.CommStats()), "stats"),
                      (dict(interconnect=INTERCONNECTS["nvlink"]), "by name")):
        f = torch.compile(lambda q, kw=kw: ringmem.ring_attention(q, q, q, **kw),
                          backend="eager", fullgraph=True)
        with pytest.raises(Exception, match=match):
            f(q)


def test_opcheck_on_one_rank() -> None:
    # torch's own check of the op's schema, fake and autograd registrations
    q, k, v = (torch.randn(1, 8, h, 4, requires_grad=True) for h in (4, 2, 2))
    from ringmem.compiled import ring_attention_op
    args = (q, k, v, None, None, None, "", True, "zigzag", "kv", "auto", None, [-1, -1], None,
            None, 1, True)
    torch.library.opcheck(ring_attention_op, args)


def _hf(rank: int, world: int) -> None:
    transformers = pytest.importorskip("transformers")
    from ringmem.integrations import hf
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    ids = torch.randint(0, 128, (1, 8 * world), generator=torch.Generator().manual_seed(1))
    packed = torch.cat([torch.arange(5), torch.arange(8 * world - 5)])[None]  # 2 documents
    for positions in (None, packed):
        pos = torch.arange(8 * world)[None] if positions is None else positions
        local_ids, local_pos = (ringmem.shard(t, layout="zigzag") for t in (ids, pos))
        runs = []
        for dtype, how in ((torch.float64, "eager"), (torch.float32, "eager"),
                           (torch.float32, "compile"), (torch.float32, "model.compile")):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
            model.set_attn_implementation(hf.register(layout="zigzag"))
            run = model
            if how == "compile":
                torch._dynamo.reset()
                explained = torch._dynamo.explain(model)(input_ids=local_ids,
                                                         position_ids=local_pos,
                                                         use_cache=False)
                assert explained.graph_break_count == 0, explained.break_reasons
                run = torch.compile(model, backend="aot_eager")
            elif how == "model.compile":
                model.compile(backend="aot_eager")
            logits = run(input_ids=local_ids, position_ids=local_pos, use_cache=False).logits
            logits.square().mean().backward()  # a training step's gradients
            runs.append([logits.detach().double()] + [p.grad.double()
                                                      for p in model.parameters()])
        truth, eager = runs[0], runs[1]
        for got in runs[2:]:
            for i, (t, e, g) in enumerate(zip(truth, eager, got)):
                base = (e - t).abs().max().item()
                assert (g - t).abs().max().item() <= 4 * base + 1e-6, (positions, i)


@pytest.mark.parametrize("world", [2, 3])
def test_hugging_face_model_compiled_prefill_and_training(world: int) -> None:
    pytest.importorskip("transformers")
    spawn(_hf, world, timeout=900)
