"""CPU shims for running an NDIF 0.1.2 server with no GPU (code that runs in the server's processes).

serve.sh installs ndif_cpu_patch.pth in the server venv: a line that puts this folder on sys.path and a
line `import ndif_cpu_patch`. Importing this module is light (nothing beyond what every interpreter has
already loaded): it only puts an import hook on sys.meta_path, so Ray's many helper processes start as
fast as without it. Nothing in the installed ndif / nnsight files is edited.

1. When a process imports nnsight's model loading (nnsight.modeling.huggingface), the hook patches
   HuggingFaceModel._hub_parameter_count to return None for a local folder or with HF_HUB_OFFLINE=1
   (no Hub call; nnsight then counts the parameters by building the model on meta).
2. CPUModelActor: a model actor that loads the model on CPU and never touches CUDA. Select it with
   NDIF_MODEL_IMPORT_PATH=ndif_cpu_patch.CPUModelActor. (No global torch.cuda patch: patching
   torch.cuda.* breaks torch._dynamo's rule table, "Duplicate torch object ... with different rules";
   the actor overrides every method that calls torch.cuda instead.)
"""
import os
import sys

TARGET = "nnsight.modeling.huggingface"


def _patch_nnsight(hf) -> None:
    """Point HuggingFaceModel._hub_parameter_count of module `hf` away from the Hub for local folders."""
    orig = hf.HuggingFaceModel._hub_parameter_count

    def _hub_parameter_count(repo_id, revision):
        if repo_id and os.path.isdir(repo_id):
            return None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return None
        return orig(repo_id, revision)

    hf.HuggingFaceModel._hub_parameter_count = staticmethod(_hub_parameter_count)


class _PatchOnImport:
    """A meta-path finder that lets the usual finders find TARGET and patches the module once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once: the finders below find the real module
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch_nnsight(module)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install() -> None:
    """Patch nnsight's model loading now if it is loaded, else when a process first imports it."""
    if TARGET in sys.modules:
        _patch_nnsight(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


install()


def __getattr__(name):
    # The Ray actor class is built on first use: only the process that hosts a model imports ray and ndif.
    if name in ("CPUModelActor", "CPUModelDeployment"):
        _build()
        return globals()[name]
    raise AttributeError(name)


def _build():
    import ray
    from ndif.services.ray.deployments.modeling import base
    from nnsight.modeling.huggingface import HuggingFaceModel

    class CPUModelDeployment(base.BaseModelDeployment):
        def load_from_disk(self):
            import time
            started = time.time()
            model = HuggingFaceModel.from_model_key(
                self.model_key, dispatch=True, dtype=self.dtype_name,
                device_map="cpu", **self.kwargs,
            )
            model._module.requires_grad_(False)
            base.logger.info(f"Loaded {self.model_key} on CPU in {time.time()-started:.1f}s")
            return model

        async def to_cache(self):
            await self.cancel(base.KILL_REASON_PREEMPTED)
            self.cached = True

        def from_cache(self, gpu_mem_bytes_by_id):
            self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id
            self.cached = False

        def cleanup(self):
            # base.cleanup minus torch.cuda.synchronize()/empty_cache()
            import gc
            self.kill_switch.clear()
            self.kill_reason = None
            self.execution_ident = None
            self.model.interleaver.cancel()
            gc.collect()

    CPUModelActor = ray.remote(num_cpus=0, max_restarts=-1)(
        type("CPUModelActor", (CPUModelDeployment,), {}))
    globals()["CPUModelDeployment"] = CPUModelDeployment
    globals()["CPUModelActor"] = CPUModelActor
