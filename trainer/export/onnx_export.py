"""PyTorch -> ONNX for MedFinder's two inference paths (needs torch, onnx and onnxscript: the ``train`` extra).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), opset 18. With torch 2.14 it exports
the MONAI 3D ResNets and the Hugging Face BERT of the text towers with a dynamic batch (and a dynamic token
length for text), traces ``MedFinder.embed_image`` as is (the legacy TorchScript exporter is deprecated and
rejects the channels-last ``contiguous(memory_format=...)`` call there), and its graph optimiser folds
BatchNorm into the convolutions and drops every weight the graph does not use.

* ``image_encoder.onnx``: ``volume`` float32 ``[B, 1, D, H, W]`` -> ``image_embedding`` ``[B, E]`` (unit rows);
  exactly ``MedFinder.embed_image``: encoder tokens, fusion of the single view with itself, head, L2 norm.
* ``text_encoder.onnx``: ``input_ids``, ``attention_mask`` int64 ``[B, T]`` -> ``text_embedding`` ``[B, E]``;
  ``MedFinder.embed_text_features(text_encoder(ids, mask))``: the frozen tower and the trained head together.
  (The output is not called ``embedding``: BERT has an internal node of that name.)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from trainer.model.medfinder import MedFinder

logger = logging.getLogger(__name__)

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
IMAGE_INPUT = "volume"
IMAGE_OUTPUT = "image_embedding"
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "text_embedding"
MAX_BATCH = 4096  # an upper bound torch.export needs for the symbolic batch dimension, not a limit in practice

EXAMPLE_TEXTS = (
    "small nodule in the right upper lobe",
    "no pleural effusion. mild emphysema in both upper lobes, heart size normal.",
)


class ImageEmbeddingGraph(nn.Module):
    """``MedFinder.embed_image`` as a module of its own, so the exporter traces exactly that path."""

    def __init__(self, model: MedFinder) -> None:
        super().__init__()
        self.model = model

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.model.embed_image(volume)


class TextEmbeddingGraph(nn.Module):
    """The frozen text tower followed by MedFinder's trained text head, as one graph."""

    def __init__(self, model: MedFinder) -> None:
        super().__init__()
        if model.text_encoder is None:
            raise ValueError("the model has no text encoder attached; build it with trainer.engine.loop.build_model")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.embed_text_features(self.model.text_encoder(input_ids, attention_mask))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO; keep their warnings, drop the chatter."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(max(item.level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter inside transformers/MONAI while tracing
            yield
    finally:
        for item, level in zip(loggers, levels):
            item.setLevel(level)


def _strip_trace_metadata(program: torch.onnx.ONNXProgram) -> None:
    """Drop per-node debug metadata (Python stack traces with this machine's paths, FX node text).

    It is not needed to run the graph, and without it the same weights always give the same bytes, so a
    bundle's content id depends on the model only.
    """
    from onnx_ir import traversal

    graph = program.model.graph
    nodes = list(traversal.RecursiveGraphIterator(graph))
    for function in program.model.functions.values():
        nodes.extend(traversal.RecursiveGraphIterator(function))
    for node in nodes:
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
        value.metadata_props.clear()


def export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                 output_name: str, dynamic_shapes: dict[str, dict[int, object]]) -> Path:
    module.eval()
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=[output_name],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    _strip_trace_metadata(program)
    program.save(str(path), external_data=False)
    module.eval()  # export restores the wrapper's mode; keep the wrapped model in eval for parity checks
    return path


def export_image_encoder(model: MedFinder, path: Path, input_shape: tuple[int, int, int]) -> Path:
    """Write ``image_encoder.onnx`` for volumes of ``input_shape`` (D, H, W), dynamic batch."""
    from torch.export import Dim

    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 1, *input_shape, generator=generator)
    logger.info("exporting image encoder: input [B, 1, %s]", ", ".join(str(n) for n in input_shape))
    batch = Dim("batch", min=1, max=MAX_BATCH)
    return export_graph(ImageEmbeddingGraph(model), (example,), Path(path), [IMAGE_INPUT], IMAGE_OUTPUT,
                   {IMAGE_INPUT: {0: batch}})


def export_text_encoder(model: MedFinder, path: Path) -> Path:
    """Write ``text_encoder.onnx`` with dynamic batch and token length (up to the tower's ``max_tokens``)."""
    from torch.export import Dim

    encoder = model.text_encoder
    input_ids, attention_mask = encoder.tokenize(list(EXAMPLE_TEXTS))
    logger.info("exporting text encoder %s: max %d tokens", encoder.name, encoder.max_tokens)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    tokens = Dim("tokens", min=2, max=int(encoder.max_tokens))  # [CLS] and [SEP] at least
    shapes = {name: {0: batch, 1: tokens} for name in TEXT_INPUTS}
    return export_graph(TextEmbeddingGraph(model), (input_ids, attention_mask), Path(path), list(TEXT_INPUTS),
                   TEXT_OUTPUT, shapes)
