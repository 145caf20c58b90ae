"""CPU shims for running an NDIF 0.1.2 server with no GPU.

Loaded in every interpreter of the server venv through ndif_cpu_patch.pth
(so the Ray controller, the model actors and the API all get it). Nothing in
the installed ndif / nnsight files is edited.

1. (no global torch patch: patching torch.cuda.* breaks torch._dynamo's rule table,
   "Duplicate torch object ... with different rules"; the CPU actor overrides every
   method that calls torch.cuda instead.)
2. nnsight's HuggingFaceModel._hub_parameter_count returns None for a local
   folder (no Hub call; nnsight then counts params by building the model on meta).
3. CPUModelActor: a model actor that loads the model on CPU and never touches
   CUDA. Select it with NDIF_MODEL_IMPORT_PATH=ndif_cpu_patch.CPUModelActor.
"""
import os


def _patch_nnsight():
    try:
        from nnsight.modeling import huggingface as hf
    except Exception:
        return
    orig = hf.HuggingFaceModel._hub_parameter_count

    def _hub_parameter_count(repo_id, revision):
        if repo_id and os.path.isdir(repo_id):
            return None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return None
        return orig(repo_id, revision)

    hf.HuggingFaceModel._hub_parameter_count = staticmethod(_hub_parameter_count)


_patch_nnsight()


def __getattr__(name):
    # Lazily build the Ray actor class (importing ray/ndif at interpreter start
    # in every venv process would be slow and could recurse).
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
