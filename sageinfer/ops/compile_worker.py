"""A compiling process of ops/compile_workers.py: reads one kernel variant a line (JSON) on its standard
input, compiles it into Triton's disk cache, answers a line on its standard output; ends at end of input.

  python -m sageinfer.ops.compile_worker

Its own process, not multiprocessing's: a spawned child would import the user's main script again, and an
engine built at a script's top level would then start again in each worker."""
from __future__ import annotations

import importlib
import json
import os
import sys
import time


def _jit_function(module: str, qualname: str):
    """The JITFunction a kernel's module defines under qualname, through autotune and heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{module}.{qualname} is not a Triton kernel")
    return fn


def _tuples(value):
    """JSON's lists back into the tuples Triton's specialization holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _constexpr(value):
    """A constexpr as Triton's serialized specialization writes it (dtypes by name, constexpr objects and
    kernels passed as arguments by a tag), made whole again."""
    import triton.language as tl
    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(value["constexpr"])
    if isinstance(value, dict) and "jit_function" in value:
        module, qualname = value["jit_function"].split(":")
        return _jit_function(module, qualname)
    return value


def _source_class(fn, kind: str):
    """The source class the launch compiles fn from (kind: its name there): Triton's, or Gluon's. Both hash
    alike, so a kernel compiled from the other's would be found under the launch's key: refused."""
    from triton.compiler import ASTSource
    if kind == "ASTSource" and not fn.is_gluon():
        return ASTSource
    if kind == "GluonASTSource" and fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource
        return GluonASTSource
    raise TypeError(f"{fn} is not compiled from a {kind}")


def compile_variant(module: str, qualname: str, specialization: str, target: list,
                    source: str = "ASTSource") -> float:
    """Compile the variant a launch would (Triton's serialized specialization: signature, constexprs,
    attributes, options) for target [backend, arch, warp size] into the disk cache, as Triton's own preload
    rebuilds one, without a device (source: the name of the launch's source class); the seconds it took."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    start = time.perf_counter()
    data = json.loads(specialization)
    fn = _jit_function(module, qualname)
    source_class = _source_class(fn, source)
    constexprs = {tuple(k): _constexpr(v) for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    signature = {k: _tuples(v) for k, v in data["signature"].items()}
    gpu = GPUTarget(*target)
    options = make_backend(gpu).parse_options({k: _tuples(v) for k, v in data["options"].items()})
    triton.compile(source_class(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    return time.perf_counter() - start


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever else prints goes to standard error
    try:
        import triton.compiler  # noqa: F401 - before the first variant arrives
    except Exception as error:  # noqa: BLE001 - said once; the engine compiles everything itself
        answers.write(json.dumps({"ready": False, "error": repr(error)}) + "\n")
        return
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        try:
            answer = {"seconds": compile_variant(job["module"], job["qualname"], job["specialization"],
                                                 job["target"], job["source"])}
        except Exception as error:  # noqa: BLE001 - the launch compiles it itself, and raises its own error
            answer = {"error": f"{type(error).__name__}: {error}"[:2000]}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
