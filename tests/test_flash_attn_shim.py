"""FlashAttnBackend's version shim, checked against fake `flash_attn` packages.

flash-attn needs CUDA, so each fake reproduces one release's `_flash_attn_forward` /
`_flash_attn_backward` calling convention exactly (parameter names and order, return tuple,
in-place dq/dk/dv, fp32 lse, bottom-right causal mask, native GQA) with a plain-PyTorch
computation that also runs on CPU in float64. Every argument is checked by name for its type
and value, so a shim that passes an argument in the wrong slot fails.
"""
import inspect
import subprocess
import sys
import types
from typing import Any, Optional, Tuple

import pytest
import torch
from torch import Tensor

import ringmem.backends.flash_attn_backend as fab
from ringmem.backends.base import Backend
from ringmem.backends.flash_attn_backend import FlashAttnBackend
from ringmem.reference import reference_attention

# ---------------------------------------------------------------- the fake computation


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool):
    """flash-attn semantics: GQA by head groups, causal mask aligned bottom-right."""
    sq, hq, sk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    kx, vx = (t.repeat_interleave(hq // hkv, dim=2) for t in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, kx) * scale
    if causal:
        keep = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    return s, kx, vx


def _fake_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool):
    s, _, vx = _attention(q, k, v, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(s - lse.unsqueeze(-1)), vx)
    return out.to(q.dtype), lse.float()  # flash-attn's lse is always fp32


def _fake_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale: float, causal: bool) -> None:
    """Fills dq, dk, dv in place from the given out and lse (like flash-attn, it trusts them)."""
    s, kx, vx = _attention(q, k, v, scale, causal)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1))
    delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)        # [B, Hq, Sq, 1]
    ds = p * (torch.einsum("bihd,bjhd->bhij", dout, vx) - delta)
    g = q.shape[2] // k.shape[2]
    dkx = torch.einsum("bhij,bihd->bjhd", ds, q) * scale
    dvx = torch.einsum("bhij,bihd->bjhd", p, dout)
    dq.copy_(torch.einsum("bhij,bjhd->bihd", ds, kx) * scale)
    dk.copy_(dkx.unflatten(2, (k.shape[2], g)).sum(3))
    dv.copy_(dvx.unflatten(2, (k.shape[2], g)).sum(3))


# ------------------------------------------------- argument checks, by parameter name


def _is_float(x: Any) -> bool:
    return type(x) is float


def _is_int(x: Any) -> bool:
    return type(x) is int


def _unit_tensor(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dim() == 4 and x.stride(-1) == 1


CHECKS = {  # what flash-attn accepts in each named slot, for ringmem's use (no dropout etc.)
    "q": _unit_tensor, "k": _unit_tensor, "v": _unit_tensor,
    "dout": _unit_tensor, "out": _unit_tensor,
    "dq": _unit_tensor, "dk": _unit_tensor, "dv": _unit_tensor,
    "softmax_lse": lambda x: (isinstance(x, Tensor) and x.dtype == torch.float32
                              and x.dim() == 3 and x.is_contiguous()),
    "dropout_p": lambda x: _is_float(x) and x == 0.0,
    "softmax_scale": lambda x: _is_float(x) and x > 0,
    "causal": lambda x: type(x) is bool,
    "return_softmax": lambda x: x is False,
    "deterministic": lambda x: type(x) is bool,
    "window_size": lambda x: isinstance(x, (tuple, list)) and len(x) == 2
    and all(_is_int(w) and w == -1 for w in x),
    "window_size_left": lambda x: _is_int(x) and x == -1,
    "window_size_right": lambda x: _is_int(x) and x == -1,
    "softcap": lambda x: _is_float(x) and x == 0.0,
    "alibi_slopes": lambda x: x is None,
    "rng_state": lambda x: x is None,
}


def _check_args(a: dict[str, Any]) -> None:
    for name, value in a.items():
        if not CHECKS[name](value):
            raise TypeError(f"fake flash_attn: bad value for {name}: {value!r:.80}")
    q, k, v = a["q"], a["k"], a["v"]
    b, sq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or hq % k.shape[2] or k.shape[3] != d:
        raise ValueError(f"fake flash_attn: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit together")
    for name, like in (("dout", q), ("out", q), ("dq", q), ("dk", k), ("dv", k)):
        if name in a and (a[name].shape != like.shape or a[name].dtype != q.dtype):
            raise ValueError(f"fake flash_attn: {name} must match in shape and q's dtype")
    if "softmax_lse" in a and a["softmax_lse"].shape != (b, hq, sq):
        raise ValueError(f"fake flash_attn: softmax_lse {tuple(a['softmax_lse'].shape)}")


# ------------------------------------------------------------ one fake per 2.x release

FWD_HEAD = ("q", "k", "v", "dropout_p", "softmax_scale", "causal")
BWD_HEAD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
            "softmax_scale", "causal")
# version: (forward params after FWD_HEAD, backward params after BWD_HEAD, forward returns)
# read off the tags of Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py
PLAIN = {
    "2.0.0": (("return_softmax",), (), 7),
    "2.2.5": (("return_softmax",), ("rng_state",), 8),
    "2.3.6": (("window_size", "return_softmax"), ("window_size", "rng_state"), 8),
    "2.4.0": (("window_size", "alibi_slopes", "return_softmax"),
              ("window_size", "alibi_slopes", "rng_state"), 8),
    "2.5.9": (("window_size", "alibi_slopes", "return_softmax"),
              ("window_size", "alibi_slopes", "deterministic", "rng_state"), 8),
    "2.6.3": (("window_size", "softcap", "alibi_slopes", "return_softmax"),
              ("window_size", "softcap", "alibi_slopes", "deterministic", "rng_state"), 8),
    # 2.7+ under torch >= 2.10, where flash-attn's string version test skips custom_op
    "2.8.3": (("window_size_left", "window_size_right", "softcap", "alibi_slopes",
               "return_softmax"),
              ("window_size_left", "window_size_right", "softcap", "alibi_slopes",
               "deterministic", "rng_state"), 4),
}


def _signature(names: tuple[str, ...]) -> inspect.Signature:
    P = inspect.Parameter
    return inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD,
                                default=None if n == "rng_state" else P.empty)
                              for n in names])


def _plain_ops(version: str, calls: list[dict[str, Any]]):
    fwd_tail, bwd_tail, n_ret = PLAIN[version]
    fsig, bsig = _signature(FWD_HEAD + fwd_tail), _signature(BWD_HEAD + bwd_tail)

    def _flash_attn_forward(*args, **kwargs):
        a = dict(fsig.bind(*args, **kwargs).arguments)  # TypeError on a bad call
        _check_args(a)
        calls.append(a)
        out, lse = _fake_fwd(a["q"], a["k"], a["v"], a["softmax_scale"], a["causal"])
        s_dmask = torch.empty(0, dtype=a["q"].dtype)
        rng_state = torch.zeros(2, dtype=torch.int64)
        if n_ret == 4:
            return out, lse, s_dmask, rng_state
        head = (out, a["q"], a["k"], a["v"], out, lse, s_dmask)  # out_padded == out
        return head + (rng_state,) if n_ret == 8 else head

    def _flash_attn_backward(*args, **kwargs):
        a = bsig.bind(*args, **kwargs)
        a.apply_defaults()
        a = dict(a.arguments)
        _check_args(a)
        calls.append(a)
        _fake_bwd(a["dout"], a["q"], a["k"], a["v"], a["out"], a["softmax_lse"], a["dq"],
                  a["dk"], a["dv"], a["softmax_scale"], a["causal"])
        softmax_d = torch.zeros(a["q"].shape[0], a["q"].shape[2], a["q"].shape[1])
        return softmax_d if n_ret == 4 else (a["dq"], a["dk"], a["dv"], softmax_d)

    _flash_attn_forward.__signature__ = fsig
    _flash_attn_backward.__signature__ = bsig
    return _flash_attn_forward, _flash_attn_backward


# 2.7 - 2.8 under torch 2.4 - 2.9: real torch.library custom ops, as flash-attn defines them
_CALLS_CUSTOM: list[dict[str, Any]] = []


@torch.library.custom_op("ringmem_fake_fa::_flash_attn_forward", mutates_args=())
def _custom_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
    causal: bool, window_size_left: int, window_size_right: int, softcap: float,
    alibi_slopes: Optional[torch.Tensor], return_softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = {k_: v_ for k_, v_ in locals().items()}
    _check_args(a)
    _CALLS_CUSTOM.append(a)
    out, lse = _fake_fwd(q, k, v, softmax_scale, causal)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("ringmem_fake_fa::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _custom_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor], dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int, softcap: float,
    alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    a = {k_: v_ for k_, v_ in locals().items()}
    _check_args(a)
    _CALLS_CUSTOM.append(a)
    _fake_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return torch.zeros(q.shape[0], q.shape[2], q.shape[1])


VERSIONS = tuple(PLAIN) + ("2.7.4-custom-op",)


def _install(monkeypatch: pytest.MonkeyPatch, version: str) -> list[dict[str, Any]]:
    """Put a fake flash_attn of this release into sys.modules; returns its call log."""
    if version in PLAIN:
        calls: list[dict[str, Any]] = []
        fwd, bwd = _plain_ops(version, calls)
    else:
        calls = _CALLS_CUSTOM
        calls.clear()
        fwd, bwd = _custom_forward, _custom_backward
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_forward, iface._flash_attn_backward = fwd, bwd
    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = version.split("-")[0]
    pkg.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    return calls


@pytest.fixture(params=VERSIONS)
def fake_fa(request, monkeypatch) -> list[dict[str, Any]]:
    return _install(monkeypatch, request.param)


# ------------------------------------------------------------------------------ tests

SCALE = 0.3  # not 1/sqrt(D): a dropped or misplaced scale shows


def _inputs(sq: int, sk: int, hq: int, hkv: int, d: int = 8, strided: bool = False):
    def make(s: int, h: int) -> Tensor:
        if strided:  # stride(-1) != 1: the shim must make these unit-stride
            return torch.randn(d, 2, s, h, dtype=torch.float64).permute(1, 2, 3, 0)
        return torch.randn(2, s, h, d, dtype=torch.float64)
    return make(sq, hq), make(sk, hkv), make(sk, hkv), make(sq, hq)


def _check_against_reference(backend: FlashAttnBackend, q, k, v, dout, causal: bool) -> None:
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = reference_attention(qr, kr, vr, causal=causal, softmax_scale=SCALE)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(out_ref, (qr, kr, vr), dout)
    out, lse = backend.fwd(q, k, v, SCALE, causal)
    # the only approximation is flash-attn's fp32 lse: errors stay near fp32 rounding
    tol = dict(rtol=1e-5, atol=1e-5)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    torch.testing.assert_close(out, out_ref.detach(), **tol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(lse.double(), lse_ref.detach(), **tol, msg=lambda m: f"lse: {m}")
    grads = backend.bwd(dout, q, k, v, out_ref.detach(), lse_ref.detach(), SCALE, causal)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, (dq_ref, dk_ref, dv_ref)):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_matches_reference(fake_fa, causal, hkv):
    q, k, v, dout = _inputs(12, 12, 4, hkv)
    _check_against_reference(FlashAttnBackend(), q, k, v, dout, causal)
    assert len(fake_fa) == 2  # one forward, one backward call reached the fake


def test_rectangular_and_strided(fake_fa):
    q, k, v, dout = _inputs(5, 11, 6, 2, strided=True)
    assert q.stride(-1) != 1
    _check_against_reference(FlashAttnBackend(), q, k, v, dout, causal=False)


def test_half_precision_dtypes_pass_through(fake_fa):
    """dq/dk/dv come back in q's dtype (flash-attn requires it), out/dout cast to it."""
    q, k, v, dout = (t.to(torch.bfloat16) for t in _inputs(8, 8, 4, 2))
    be = FlashAttnBackend()
    out, lse = be.fwd(q, k, v, SCALE, True)
    dq, dk, dv = be.bwd(dout.float(), q, k, v, out.float(), lse, SCALE, True)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


def test_deterministic_flag_reaches_backward(fake_fa):
    q, k, v, dout = _inputs(6, 6, 2, 1)
    be = FlashAttnBackend(deterministic=True)
    out, lse = be.fwd(q, k, v, SCALE, True)
    be.bwd(dout, q, k, v, out, lse, SCALE, True)
    bwd_args = fake_fa[-1]
    if "deterministic" in bwd_args:  # 2.4.1+
        assert bwd_args["deterministic"] is True


def test_non_square_causal_is_refused(fake_fa):
    q, k, v, _ = _inputs(4, 8, 2, 2)
    with pytest.raises(ValueError, match="square"):
        FlashAttnBackend().fwd(q, k, v, SCALE, True)
    assert not fake_fa


def test_empty_key_block(fake_fa):
    """flash-attn reports lse = +inf for no keys; the protocol wants -inf and zero output."""
    q, k, v, dout = _inputs(3, 0, 2, 1)
    out, lse = FlashAttnBackend().fwd(q, k, v, SCALE, False)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    dq, dk, dv = FlashAttnBackend().bwd(dout, q, k, v, out, lse, SCALE, False)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


SWAPS = [("k", "v"), ("q", "dout"), ("dropout_p", "softmax_scale"),
         ("causal", "return_softmax"), ("window_size_left", "softcap"),
         ("causal", "deterministic")]


@pytest.mark.parametrize("swap", SWAPS, ids=["-".join(s) for s in SWAPS])
@pytest.mark.parametrize("version", ["2.0.0", "2.6.3", "2.7.4-custom-op"])
def test_these_tests_catch_swapped_arguments(monkeypatch, version, swap):
    """A shim that puts two arguments in each other's slots must fail the checks above."""
    _install(monkeypatch, version)
    real_call = fab._call
    a, b = swap

    def swapped(fn, values):
        names, _ = fab._param_names(fn)
        if a not in names or b not in names:
            pytest.skip(f"flash-attn {version} has no {a} / {b} pair in this op")
        values = dict(values)
        values[a], values[b] = values[b], values[a]
        return real_call(fn, values)

    monkeypatch.setattr(fab, "_call", swapped)
    q, k, v, dout = _inputs(8, 8, 4, 2)
    with pytest.raises((TypeError, ValueError, RuntimeError, AssertionError)):
        _check_against_reference(FlashAttnBackend(deterministic=False), q, k, v, dout, True)


def test_param_names_of_custom_op_and_schema():
    names = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
             "window_size_right", "softcap", "alibi_slopes", "return_softmax")
    assert inspect.signature(_custom_forward).parameters.keys() <= {"args", "kwargs"}
    assert fab._param_names(_custom_forward)[0] == names  # via the decorated function
    packet = torch.ops.ringmem_fake_fa._flash_attn_forward  # via the op schema
    assert fab._param_names(packet)[0] == names
    assert fab._param_names(_custom_backward)[1] == {"rng_state"}


def test_unknown_required_parameter_is_reported(monkeypatch):
    calls = _install(monkeypatch, "2.6.3")

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, new_knob, return_softmax):
        raise AssertionError("must not be called")

    monkeypatch.setattr(sys.modules["flash_attn.flash_attn_interface"], "_flash_attn_forward",
                        _flash_attn_forward)
    q, k, v, _ = _inputs(4, 4, 2, 2)
    with pytest.raises(RuntimeError, match="new_knob"):
        FlashAttnBackend().fwd(q, k, v, SCALE, False)
    assert not calls


def test_unsupported_when_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    monkeypatch.delitem(sys.modules, "flash_attn.flash_attn_interface", raising=False)
    monkeypatch.setattr(fab, "_import_error", None)
    be = FlashAttnBackend()
    why = be.unsupported(torch.device("cuda"), torch.bfloat16, 128)
    assert why and "flash_attn" in why
    q, k, v, _ = _inputs(4, 4, 2, 2)
    with pytest.raises(RuntimeError, match="flash_attn"):
        be.fwd(q, k, v, SCALE, False)


def test_unsupported_reasons(monkeypatch):
    _install(monkeypatch, "2.8.3")
    be = FlashAttnBackend()
    cuda = torch.device("cuda")
    assert "CUDA" in be.unsupported(torch.device("cpu"), torch.bfloat16, 128)
    assert "float16 or bfloat16" in be.unsupported(cuda, torch.float32, 128)
    assert "head_dim" in be.unsupported(cuda, torch.float16, 100)
    assert "head_dim" in be.unsupported(cuda, torch.float16, 264)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "Ampere" in be.unsupported(cuda, torch.float16, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert be.unsupported(cuda, torch.bfloat16, 256) is None
    assert be.unsupported(cuda, torch.float16, 64) is None


def test_protocol_and_lazy_import():
    assert isinstance(FlashAttnBackend(), Backend) and FlashAttnBackend.name == "flash_attn"
    code = ("import sys, ringmem, ringmem.backends.flash_attn_backend as m; "
            "assert 'flash_attn' not in sys.modules, 'imported at module import'")
    subprocess.run([sys.executable, "-c", code], check=True)
