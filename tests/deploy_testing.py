"""Images shared by the export and quantization tests: real orthophoto tiles when
../shared/data is present, procedural aerial-like images otherwise."""
from pathlib import Path

from mean_nav.deploy.images import load_images

MAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "orthophotos" / "test_tiled.tif"


def sample_images(n: int, size: int):
    if MAP.is_file():
        return load_images(MAP, n, size)
    print(f"shared data absent ({MAP}); using procedural images")
    return load_images(None, n, size)


def tiny_deploy_onnx(path: Path, size: int = 32, dim: int = 16, seed: int = 0) -> Path:
    """A MEAN-like deploy ONNX built with onnx.helper, no torch: Conv(+bias)-Relu-Conv-Relu-GAP-
    Gemm(transB)-MatMul-L2 norm, [N,3,size,size] float -> [N,dim] unit descriptors, opset 17,
    with mean_nav metadata. Every quantizable weight kind (Conv, Gemm, MatMul) appears once."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mean_nav.deploy.deploy_info import DeployInfo
    from mean_nav.deploy.embedder import Preprocessing
    from mean_nav.deploy.export import set_metadata

    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    inits = [weight("c1.w", 8, 3, 3, 3), weight("c1.b", 8), weight("c2.w", 16, 8, 3, 3), weight("c2.b", 16),
             weight("fc.w", dim, 16), weight("fc.b", dim), weight("proj.w", dim, dim),
             numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], name="fc", transB=1),
        helper.make_node("MatMul", ["fc", "proj.w"], ["proj"], name="proj"),
        helper.make_node("ReduceL2", ["proj"], ["norm"], name="norm", axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"], name="clamp"),
        helper.make_node("Div", ["proj", "safe_norm"], ["descriptor"], name="l2"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mean", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    set_metadata(model, DeployInfo(f"{seed:016x}", "tiny", dim, Preprocessing(img_size=size)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
