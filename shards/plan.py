"""A batch's drawn parameters packed for the device (`BatchPlan`): built on the CPU in a loader
worker, copied to the device in one piece, read there by slicing at offsets the host knows."""

from __future__ import annotations

import math

import torch

from .params import CropParams
from .pixel_ops import blend_factor, lut_argument, warp_coefficients
from .policy import OPS, AugmentPolicy


class BatchPlan:
    """A batch's drawn parameters as the device needs them, built on the CPU (in a loader worker):
    one int64 tensor, so one copy to the device, sliced at offsets the host knows (views: no
    launch, no sync). For each RandAugment layer and op family the rows that drew it and their
    arguments; for each erasing box slot its rows, boxes and noise keys. Every field exists in
    every plan (empty where no row drew it), so a render launches the same kernels whatever was
    drawn and however large the batch."""

    def __init__(self, packed: torch.Tensor, fields: dict[str, tuple[int, tuple[int, ...]]], size: int):
        self.packed, self.fields, self.size = packed, fields, size

    @classmethod
    def build(cls, params: list[CropParams], policy: AugmentPolicy) -> BatchPlan:
        spec = policy.randaugment
        layers = spec.num_layers if spec is not None else 0
        size = policy.input_size
        columns: dict[str, list] = {}
        for layer in range(layers):
            for family in ("lut", "blend", "warp"):
                columns[f"{family}{layer}.rows"] = []
            columns.update({f"lut{layer}.code": [], f"lut{layer}.arg": [], f"blend{layer}.code": [],
                            f"blend{layer}.factor": [], f"warp{layer}.coeffs": []})  # fmt: skip
        for slot in range(policy.re_count):
            columns.update({f"erase{slot}.rows": [], f"erase{slot}.box": [], f"erase{slot}.key": []})
        for i, p in enumerate(params):
            for layer, (name, arg) in enumerate(p.ops):
                op = OPS[name]
                columns[f"{op.family}{layer}.rows"].append(i)
                if op.family == "lut":
                    columns[f"lut{layer}.code"].append(op.code)
                    columns[f"lut{layer}.arg"].append(lut_argument(name, arg))
                elif op.family == "blend":
                    columns[f"blend{layer}.code"].append(op.code)
                    columns[f"blend{layer}.factor"].append(blend_factor(arg))
                else:
                    columns[f"warp{layer}.coeffs"].append(warp_coefficients(name, arg, size))
            for slot, box in enumerate(p.erase):
                columns[f"erase{slot}.rows"].append(i)
                columns[f"erase{slot}.box"].append(box)
                columns[f"erase{slot}.key"].append((p.noise_key & 0xFFFFFFFF, p.noise_key >> 32))
        width = {"factor": 2, "coeffs": 6, "box": 4, "key": 2}
        fields, flat, at = {}, [], 0
        for name, values in columns.items():
            shape = (len(values), width[name.split(".")[1]]) if name.split(".")[1] in width else (len(values),)
            fields[name] = (at, shape)
            at += math.prod(shape)
            flat.extend(v for row in values for v in (row if isinstance(row, list | tuple) else (row,)))
        return cls(torch.tensor(flat, dtype=torch.int64), fields, len(params))

    def __getitem__(self, name: str) -> torch.Tensor:
        at, shape = self.fields[name]
        return self.packed[at : at + math.prod(shape)].view(shape)

    def rows(self, name: str) -> int:
        """How many rows drew `name` (a family of a layer, "warp0", or an erasing slot): host-known."""
        return self.fields[f"{name}.rows"][1][0]

    def to(self, device, non_blocking: bool = False) -> BatchPlan:
        if self.packed.device == torch.device(device):
            return self
        return BatchPlan(self.packed.to(device, non_blocking=non_blocking), self.fields, self.size)

    def pin_memory(self) -> BatchPlan:  # the DataLoader's pin_memory calls it
        return BatchPlan(self.packed.pin_memory(), self.fields, self.size)

    def layers(self) -> int:
        return sum(1 for name in self.fields if name.startswith("lut") and name.endswith(".rows"))

    def slots(self) -> int:
        return sum(1 for name in self.fields if name.startswith("erase") and name.endswith(".rows"))
