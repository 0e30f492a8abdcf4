"""Decoding on the device (the `nvjpeg` decoder): a batch of JPEGs decoded where the model runs, in
one call, then cut and resized there (`crops_on_device`). Beside `decode.py`, which decodes with
Pillow where the loader runs. An image the device's decoder refuses is an error naming it: under
`nvjpeg` no image is ever decoded by another decoder, whose pixels would not be the labels'.
"""

from __future__ import annotations

import warnings

import torch

from .crop import cut_region, resized_regions


def check_device(policy, device) -> None:
    """A policy that decodes with nvJPEG renders on a CUDA device only: a clear error elsewhere."""
    device = torch.device(device)
    if getattr(policy, "decoder", "libjpeg") == "nvjpeg" and device.type != "cuda":
        where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"it was asked for {device}"
        raise ValueError(
            f"the augmentation policy decodes JPEGs with nvJPEG, which runs on a CUDA device, and {where}; "
            "labels made with nvJPEG pixels can only be used where nvJPEG decodes (or precompute labels with "
            "decoder libjpeg)"
        )


def device_decoder_library() -> str:
    """Which library decodes JPEGs on the device: "torchcodec" where it is installed (torchvision's
    decoders are deprecated since 0.29 in its favour), else "torchvision"."""
    import importlib.util

    return "torchcodec" if importlib.util.find_spec("torchcodec") is not None else "torchvision"


def decode_on_device(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on `device` in one batched call (nvJPEG on CUDA, libjpeg-turbo on the CPU), by
    `device_decoder_library`. Both take a list of 1-D uint8 CPU tensors and give a list of (3, H, W)
    uint8 tensors on `device` (TorchCodec 0.17's `decode_jpeg(source: list, *, mode="RGB", device)`;
    torchvision's `decode_jpeg(input: list, mode=ImageReadMode.RGB, device=...)`)."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if device_decoder_library() == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return list(decode_jpeg(tensors, mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


class DeviceDecodeError(ValueError):
    """The device's decoder (nvJPEG) cannot decode an image of a batch. Under the nvjpeg decoder no
    image is ever decoded by another decoder: its pixels would not be the ones the labels and the
    render fingerprint were made from. `index` is the image's place in the batch."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def crops_on_device(items: list[tuple], policy, device, keys: list[str] | None = None) -> torch.Tensor:
    """The uint8 (B, 3, S, S) crops of prepared items on `device`: (uint8 crop, params) as they
    are, (JPEG bytes, params) decoded there in one batched call, then cut and resized there. An
    image the device cannot decode raises DeviceDecodeError naming it (`keys`: the images' keys)."""
    device = torch.device(device)
    sources = [source for source, _ in items]
    encoded = [i for i, source in enumerate(sources) if isinstance(source, bytes | bytearray)]
    if encoded:
        check_device(policy, device)
        try:
            images = decode_on_device([sources[i] for i in encoded], device)
        except Exception as batch_error:  # which image: one at a time, on the same decoder
            for i in encoded:
                try:
                    decode_on_device([sources[i]], device)
                except Exception as e:
                    name = repr(keys[i]) if keys else f"{i} of the batch"
                    raise DeviceDecodeError(
                        f"the device's JPEG decoder cannot decode image {name} ({e}); under the nvjpeg decoder no "
                        "image is decoded by another (its pixels would not be the labels'): build the shards "
                        "without it, or label with decoder libjpeg",
                        i,
                    ) from e
            raise batch_error
        regions = [cut_region(image, items[i][1].box) for i, image in zip(encoded, images, strict=True)]
        for i, crop in zip(encoded, resized_regions(regions, [items[i][1] for i in encoded], policy)):
            sources[i] = crop
    return torch.stack([s.to(device, non_blocking=True) for s in sources])
