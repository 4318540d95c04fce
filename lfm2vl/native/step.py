"""The C decode step (step.c) as Python sees it: its tables as ctypes structures, and one call.
Which models it takes and how their tensors fill the tables: lfm2vl/quant/step.py."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from . import library

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
INT8, INT4 = 1, 2  # step.c's qlinear_t.kind
MAX_HEAD_DIM, MAX_CONV_K = 512, 16  # step.c's


class QLinear(ctypes.Structure):
    _fields_ = [("kind", _I32), ("_pad", _I32), ("n", _I64), ("k", _I64), ("block", _I64),
                ("w", _P), ("scale", _P), ("bias", _P)]


class Layer(ctypes.Structure):
    _fields_ = [("attention", _I32), ("_pad", _I32), ("operator_norm", _P), ("ffn_norm", _P), ("op", QLinear * 4),
                ("w1", QLinear), ("w3", QLinear), ("w2", QLinear), ("conv_w", _P), ("conv_b", _P),
                ("q_norm", _P), ("k_norm", _P), ("kt", _P), ("v", _P), ("conv_state", _P)]


class Model(ctypes.Structure):
    _fields_ = [("n_layers", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
                ("conv_k", _I64), ("max_len", _I64), ("eps", ctypes.c_float), ("state_bf16", _I32),
                ("final_norm", _P), ("cos", _P), ("sin", _P), ("layers", ctypes.POINTER(Layer))]


@dataclass
class Table:
    """A filled Model structure and the weights it points at (kept alive while it is used)."""

    model: Model
    layers: ctypes.Array
    tensors: list[torch.Tensor]


def available() -> bool:
    return library() is not None


def decode_step(table: Table, x: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
    """x (B, D) float32 -> (B, D) float32 after the final norm; writes each row's K/V at its position
    and its conv states, through the table's pointers."""
    lib = library()
    x = x.contiguous()
    out = torch.empty_like(x)
    b = x.shape[0]
    rows = (_I64 * (2 * b))(*slots, *positions)
    status = lib.decode_step(ctypes.addressof(table.model), x.data_ptr(), out.data_ptr(), b, ctypes.addressof(rows),
                ctypes.addressof(rows) + 8 * b, torch.get_num_threads(), lib.isa)
    if status == -1:
        raise MemoryError("lfm2vl/native: no memory for the decode step's scratch")
    if status != 0:
        raise ValueError(f"lfm2vl/native: the decode step does not take this model's shapes (status {status})")
    return out
