"""Mask-aware ``nn.Linear`` with an element mask and a neuron (output-row) mask (SPEC 3).

The element mask has one bool per weight, as many bytes as a quarter of the float weights; most runs
prune neurons only, so it is allocated the first time it is read or written and released when a mask
change or a load leaves it all open (see ``MaskedLinear.element_mask``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torchrec_prune.masks.compact import CompactLayer

_masks_seen_changed = 0  # times any MaskedLinear found its masks written or replaced since it last looked


def masks_seen_changed() -> int:
    """How many times any ``MaskedLinear`` in this process found its masks written in place, replaced or
    loaded since it last read them (each forward reads them). While this and the module registrations
    stay put, the masks every forward since used are the same: a per-step consumer (the trainer's FLOPs)
    compares one integer instead of every mask's identity and version."""
    return _masks_seen_changed


class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` whose effective weight is ``W * weight_mask`` with rows gated by ``neuron_mask``.

    It subclasses ``nn.Linear`` so that ``weight``/``bias`` keep their state-dict keys and code that
    checks ``isinstance(m, nn.Linear)`` still sees a Linear. Masks are buffers, so they travel in
    ``state_dict()``, DMP's sharded state dict and DCP checkpoints. A plain Linear's state dict (no mask
    keys, e.g. a checkpoint written before ``wrap``) loads strictly, with every mask open.

    When neurons are masked (rows of this layer) or inputs are masked (``input_mask``, set when the
    previous layer's neurons are pruned), the forward gathers the active sub-matrix and runs the smaller
    matmul, then scatters the kept outputs back into a full-width tensor of zeros: structured sparsity
    saves real time. While masks stay put, ``torchrec_prune.masks.compact.compact_`` makes the layer hold
    and train its kept block only (``compacted``), which saves more.

    ``weight_mask`` reads like a buffer (``layer.weight_mask[0, 1] = False`` works) but is held only while
    some element is closed: reading the attribute allocates it, ``set_masks_`` and ``load_state_dict``
    release it when it is all open, and ``state_dict()`` writes an open one as ones (old checkpoints and
    DCP load unchanged). Code that only looks uses ``element_mask()``/``kept_mask()``, which allocate
    nothing: with structured masks alone the masks take ``(in + out) / (in * out)`` bytes per weight.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias.
        device: where parameters and masks live (``meta`` allowed; ``reset_parameters`` sets masks).
        dtype: parameter dtype.

    Example::

        layer = MaskedLinear(8, 4)
        layer.neuron_mask[1] = False
        y = layer(torch.randn(2, 8))  # y[:, 1] == 0
    """

    weight_mask: torch.Tensor
    neuron_mask: torch.Tensor
    input_mask: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_mask", None)  # allocated on first use: see the class docstring
        self.register_buffer("neuron_mask", torch.ones(out_features, dtype=torch.bool, device=device))
        self.register_buffer("input_mask", torch.ones(in_features, dtype=torch.bool, device=device))
        self._index_cache: tuple[Any, ...] | None = None  # see _structure
        # Mask-learning pruners (AUX) need dL/d(effective weight) also where the mask is closed, which
        # weight.grad (= g * mask) hides: with the flag on, backward stores it in ``effective_grad``.
        self.capture_effective_grad = False
        self.effective_grad: torch.Tensor | None = None
        # Set while the layer trains its kept block only (``torchrec_prune.masks.compact``).
        self.compacted: CompactLayer | None = None
        self._register_load_state_dict_pre_hook(_load_masks, with_module=True)

    def __getattr__(self, name: str) -> Any:
        buffers = self.__dict__.get("_buffers")
        if name == "weight_mask" and buffers is not None and "weight_mask" in buffers:
            if buffers["weight_mask"] is None:  # a caller may write it: hold a real mask from now on
                buffers["weight_mask"] = self._open_element_mask()
            return buffers["weight_mask"]
        return super().__getattr__(name)

    def _open_element_mask(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)  # the weight's, also while compacted
        return torch.ones(shape, dtype=torch.bool, device=self.weight.device)

    def element_mask(self) -> torch.Tensor | None:
        """The element mask if one is held, ``None`` when every element is open (allocates nothing)."""
        return self._buffers["weight_mask"]

    def kept_mask(self) -> torch.Tensor:
        """Weights kept by all three masks together, as a bool tensor of the weight's shape."""
        keep = self.neuron_mask.unsqueeze(1) & self.input_mask.unsqueeze(0)
        element = self.element_mask()
        return keep & element if element is not None else keep.expand(self.out_features, self.in_features)

    @torch.no_grad()
    def release_open_element_mask_(self) -> bool:
        """Drop the element mask if every entry is open (one host sync); whether none is held now."""
        element = self.element_mask()
        if element is not None and element.device.type != "meta" and bool(element.all()):
            self.weight_mask = None
        return self.element_mask() is None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.compacted is not None:  # checkpoints always hold the full layer
            destination[prefix + "weight"] = self.full_weight()
            if self.bias is not None:
                destination[prefix + "bias"] = self._full(self.compacted.full_bias, self.bias)
        if self.element_mask() is None:  # the key every checkpoint has, in its place before the others
            tail = {k: destination.pop(prefix + k) for k in ("neuron_mask", "input_mask")}
            destination[prefix + "weight_mask"] = self._open_element_mask()
            destination.update({prefix + k: v for k, v in tail.items()})

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MaskedLinear:
        """Build a masked copy that shares ``linear``'s parameter objects (optimizers stay valid)."""
        w = linear.weight
        masked = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=w.dtype,
        )
        masked.weight = w
        masked.bias = linear.bias
        for name in ("neuron_mask", "input_mask"):
            buf = getattr(masked, name)
            setattr(masked, name, torch.ones(buf.shape, dtype=torch.bool, device=w.device))
        masked.train(linear.training)
        return masked

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # DMP materialises meta buffers as zeros and then calls reset_parameters: masks start open.
        for name in ("weight_mask", "neuron_mask", "input_mask"):
            buf = self.__dict__.get("_buffers", {}).get(name)
            if buf is not None and buf.device.type != "meta":
                with torch.no_grad():
                    buf.fill_(True)

    # ----------------------------------------------------------------------------------------------
    def full_weight(self) -> torch.Tensor:
        """The weight at full size, also while compacted (then a new tensor)."""
        return self.weight if self.compacted is None else self._full(self.compacted.full_weight, self.weight)

    def _full(self, held: torch.Tensor | None, block: torch.Tensor) -> torch.Tensor:
        assert held is not None and self.compacted is not None
        full = held.detach().clone()
        self.compacted.put_back(full, block.detach())
        return full

    def effective_weight(self) -> torch.Tensor:
        """Dense weight with every mask applied (pruned entries are exact zeros)."""
        return self.full_weight() * self.kept_mask()

    def effective_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias * self.neuron_mask

    def _structure(self) -> tuple[bool, bool, torch.Tensor, torch.Tensor]:
        # Cached until a mask buffer is replaced or changed in place (load_state_dict, prune, grow), so
        # the forward pays no host sync per call. The cache holds the mask tensors themselves (an id()
        # could be reused) and their ``_version``s; buffers are read from the dict, not through
        # ``__getattr__``, since this runs at every forward.
        buffers = self._buffers
        element, neuron, inputs = buffers["weight_mask"], buffers["neuron_mask"], buffers["input_mask"]
        cache = self._index_cache
        if (
            cache is not None
            and cache[0] is element
            and cache[1] is neuron
            and cache[2] is inputs
            and cache[3] == (-1 if element is None else element._version)
            and cache[4] == neuron._version
            and cache[5] == inputs._version
        ):
            return cache[6]
        global _masks_seen_changed
        _masks_seen_changed += 1
        rows = neuron.nonzero().squeeze(1)
        cols = inputs.nonzero().squeeze(1)
        structured = rows.numel() < self.out_features or cols.numel() < self.in_features
        elementwise = element is not None and not bool(element.all())
        version = -1 if element is None else element._version
        found = (structured, elementwise, rows, cols)
        self._index_cache = (element, neuron, inputs, version, neuron._version, inputs._version, found)
        return found

    def is_structured(self) -> bool:
        """Whether any neuron or input is masked, so that the compacted forward applies."""
        return self._structure()[0]

    def active_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of kept output rows and kept input columns."""
        _, _, rows, cols = self._structure()
        return rows, cols

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        compact = self.compacted
        if compact is not None:  # the kept block only, narrow input and output where the chain allows
            x = input.index_select(-1, compact.cols) if compact.gather_input else input
            out = F.linear(x, self.weight, self.bias)
            if not compact.scatter_output:
                return out
            return out.new_zeros(*out.shape[:-1], self.out_features).index_copy(-1, compact.rows, out)
        structured, elementwise, rows, cols = self._structure()
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        capture = self.capture_effective_grad
        if not (structured or elementwise or capture):  # every mask open: a plain Linear
            return F.linear(input, weight, bias)
        element = self._buffers["weight_mask"]
        if element is not None and (elementwise or capture):
            weight = weight * element
        elif capture:
            weight = weight.view_as(weight)  # a non-leaf to hook: the effective weight is the weight
        if capture and weight.requires_grad:
            weight.register_hook(self._store_effective_grad)
        if not structured:
            return F.linear(input, weight, bias)
        w = weight.index_select(0, rows).index_select(1, cols)
        b = None if bias is None else bias.index_select(0, rows)
        out_small = F.linear(input.index_select(-1, cols), w, b)
        out = out_small.new_zeros(*input.shape[:-1], self.out_features)
        return out.index_copy(-1, rows, out_small)

    def _store_effective_grad(self, grad: torch.Tensor) -> None:
        self.effective_grad = grad.detach() if self.effective_grad is None else self.effective_grad + grad

    def extra_repr(self) -> str:
        kept = int(self.neuron_mask.sum()) if self.neuron_mask.device.type != "meta" else self.out_features
        return f"{super().extra_repr()}, kept_neurons={kept}"


def _load_masks(
    module: MaskedLinear,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook. A state dict with the weight but none of the masks is a plain Linear's:
    its masks load open (one or two masks missing stays an error under ``strict``). An all-open element
    mask is not held; any other is loaded into a held one."""
    if module.compacted is not None:
        raise RuntimeError(
            f"{prefix.rstrip('.') or 'MaskedLinear'}: cannot load into a compacted layer; expand it first "
            "(torchrec_prune.masks.compact.expand_)"
        )
    names = ("weight_mask", "neuron_mask", "input_mask")
    if prefix + "weight" in state_dict and not any(prefix + k in state_dict for k in names):
        for name in names[1:]:
            state_dict[prefix + name] = torch.ones_like(getattr(module, name))
        module.weight_mask = None
        return
    key = prefix + "weight_mask"
    value = state_dict.get(key)
    if value is None:
        if strict and module.element_mask() is None:
            missing_keys.append(key)  # an unheld buffer is not among the keys the loader checks
        return
    shaped = isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(module.weight.shape)
    if shaped and value.device.type != "meta" and bool(value.all()):
        del state_dict[key]
        module.weight_mask = None
    else:
        module.weight_mask  # noqa: B018 -- held, so the loader copies into it (or reports its shape)
