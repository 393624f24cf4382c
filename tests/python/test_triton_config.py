"""docs/triton: the model repository's config.pbtxt is valid Triton model configuration.

Triton itself cannot run here, so the check is the one Triton does first: parse the file as
protobuf text format against `inference.ModelConfig`. The schema below is the subset of
Triton's model_config.proto (triton-inference-server/common, protobuf/model_config.proto) that
the example uses, with the same field names, numbers and types; text_format rejects unknown
fields, wrong types and bad enum values, so a typo fails here as it would in the server. Then
the config must match what it serves: the onnxruntime backend, the GhostShift library, and the
input/output names, types and shapes of the ghost model `ghostsr convert` makes of the fixture.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "docs" / "triton" / "model_repository"
CONFIG = REPO / "ghost_sr" / "config.pbtxt"
FIXTURE = ROOT / "fixtures" / "edsr_baseline_b4c32_x2.onnx"

F = descriptor_pb2.FieldDescriptorProto
OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED


def _field(msg, name, number, ftype, label=OPT, type_name=None):
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name


def _model_config_class():
    fd = descriptor_pb2.FileDescriptorProto(name="ghostsr_triton_subset.proto", package="inference",
                                            syntax="proto3")
    dt = fd.enum_type.add(name="DataType")
    for i, n in enumerate(["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                           "INT32", "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]):
        dt.value.add(name=f"TYPE_{n}", number=i)

    reshape = fd.message_type.add(name="ModelTensorReshape")
    _field(reshape, "shape", 1, F.TYPE_INT64, REP)

    inp = fd.message_type.add(name="ModelInput")
    fmt = inp.enum_type.add(name="Format")
    for i, n in enumerate(["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"]):
        fmt.value.add(name=n, number=i)
    _field(inp, "name", 1, F.TYPE_STRING)
    _field(inp, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
    _field(inp, "format", 3, F.TYPE_ENUM, type_name=".inference.ModelInput.Format")
    _field(inp, "dims", 4, F.TYPE_INT64, REP)
    _field(inp, "reshape", 5, F.TYPE_MESSAGE, type_name=".inference.ModelTensorReshape")
    _field(inp, "optional", 8, F.TYPE_BOOL)

    out = fd.message_type.add(name="ModelOutput")
    _field(out, "name", 1, F.TYPE_STRING)
    _field(out, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
    _field(out, "dims", 3, F.TYPE_INT64, REP)
    _field(out, "label_filename", 4, F.TYPE_STRING)
    _field(out, "reshape", 5, F.TYPE_MESSAGE, type_name=".inference.ModelTensorReshape")

    group = fd.message_type.add(name="ModelInstanceGroup")
    kind = group.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    _field(group, "name", 1, F.TYPE_STRING)
    _field(group, "count", 2, F.TYPE_INT32)
    _field(group, "gpus", 3, F.TYPE_INT32, REP)
    _field(group, "kind", 4, F.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")

    batching = fd.message_type.add(name="ModelDynamicBatching")
    _field(batching, "preferred_batch_size", 1, F.TYPE_INT32, REP)
    _field(batching, "max_queue_delay_microseconds", 2, F.TYPE_UINT64)

    ops = fd.message_type.add(name="ModelOperations")
    _field(ops, "op_library_filename", 1, F.TYPE_STRING, REP)

    cfg = fd.message_type.add(name="ModelConfig")
    _field(cfg, "name", 1, F.TYPE_STRING)
    _field(cfg, "platform", 2, F.TYPE_STRING)
    _field(cfg, "max_batch_size", 4, F.TYPE_INT32)
    _field(cfg, "input", 5, F.TYPE_MESSAGE, REP, ".inference.ModelInput")
    _field(cfg, "output", 6, F.TYPE_MESSAGE, REP, ".inference.ModelOutput")
    _field(cfg, "instance_group", 7, F.TYPE_MESSAGE, REP, ".inference.ModelInstanceGroup")
    _field(cfg, "default_model_filename", 8, F.TYPE_STRING)
    _field(cfg, "dynamic_batching", 11, F.TYPE_MESSAGE, type_name=".inference.ModelDynamicBatching")
    _field(cfg, "backend", 17, F.TYPE_STRING)
    _field(cfg, "model_operations", 18, F.TYPE_MESSAGE, type_name=".inference.ModelOperations")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = _model_config_class()


def parse(text: str):
    return text_format.Parse(text, ModelConfig())


def test_config_parses_as_triton_model_config():
    cfg = parse(CONFIG.read_text())
    assert cfg.name == CONFIG.parent.name, "Triton requires the name to be the model's folder name"
    assert cfg.backend == "onnxruntime"
    libs = list(cfg.model_operations.op_library_filename)
    assert len(libs) == 1 and libs[0].startswith("/") and libs[0].endswith("/libghostsr.so"), libs
    assert (CONFIG.parent / "1").is_dir(), "Triton loads version folders: ghost_sr/1/model.onnx"


def test_the_schema_check_rejects_mistakes():
    good = CONFIG.read_text()
    for bad in [
        good.replace("op_library_filename", "op_library_file"),  # misspelt field
        good.replace("TYPE_FP32", "TYPE_FLOAT32", 1),  # no such enum value
        good.replace("max_batch_size: 8", 'max_batch_size: "8"'),  # wrong type
        good.replace("dims: [ 3, -1, -1 ]", "dims: [ 3, -1, -1 ", 1),  # unclosed list
        good.replace("model_operations {", "model_operations [", 1),  # bad syntax
    ]:
        assert bad != good
        with pytest.raises(text_format.ParseError):
            parse(bad)


def test_config_matches_the_ghost_model_it_serves(convert):
    ghost, _plan = convert(FIXTURE)
    model = onnx.load(str(ghost))
    assert any(o.domain == "ai.ghostsr" for o in model.opset_import), "plugin form expected"
    cfg = parse(CONFIG.read_text())
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    for spec, values in ((cfg.input, graph_inputs), (cfg.output, list(model.graph.output))):
        assert [s.name for s in spec] == [v.name for v in values]
        for s, v in zip(spec, values):
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert ModelConfig.DESCRIPTOR.file.pool.FindEnumTypeByName(
                "inference.DataType").values_by_number[s.data_type].name == "TYPE_FP32"
            dims = v.type.tensor_type.shape.dim
            # max_batch_size > 0: Triton adds the batch dimension, so dims leave out dim 0.
            assert cfg.max_batch_size > 0 and not dims[0].HasField("dim_value")
            want = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
            assert list(s.dims) == want, (s.name, list(s.dims), want)
