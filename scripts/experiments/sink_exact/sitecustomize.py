"""EXPERIMENT (not product code): keep the K/V of each sequence's first token (position 0) exact in
the E8 CPU path, to measure how much of the perplexity cost the attention-sink token carries."""
import os
def _apply():
    try:
        import torch
        import e8vllm.kernels.reference as R
        from e8vllm.vllm_plugin import impl as I

        _STORE = {}     # id(kv_cache) -> float32 [num_blocks, H, 2, D] exact values of slot offset 0 (mapped domain)
        _CTX = {}       # current sink slots and store for the patched decode
        _orig_write = I.E8ImplMixin._e8_write_codes
        _orig_attend = I.E8ImplMixin._e8_attend
        _orig_gather = R._gather_codes
        _orig_decode = R.E8KVFormat.decode_kv_rotated

        def _write(self, key, value, kv_cache, slot_mapping):
            _orig_write(self, key, value, kv_cache, slot_mapping)
            bs = kv_cache.shape[2]
            st = _STORE.get(id(kv_cache))
            if st is None:
                st = _STORE[id(kv_cache)] = torch.zeros(kv_cache.shape[0], kv_cache.shape[1], 2, key.shape[-1])
            sl = slot_mapping[: key.shape[0]].long()
            m = (sl >= 0) & (sl % bs == 0)
            if bool(m.any()):
                idx = m.nonzero().squeeze(1)
                st[sl[idx] // bs, :, 0] = key[idx].float()
                st[sl[idx] // bs, :, 1] = value[idx].float()

        def _attend(self, q, kv_cache, md, out, key_bias=None):
            b = md.query_start_loc.shape[0] - 1
            bs = kv_cache.shape[2]
            _CTX["sinks"] = set((md.block_table[:b, 0].long() * bs).tolist())
            _CTX["store"] = _STORE.get(id(kv_cache))
            _CTX["bs"] = bs
            try:
                _orig_attend(self, q, kv_cache, md, out, key_bias)
            finally:
                _CTX.clear()

        def _gather(kv_cache, slots):
            _CTX["slots"] = slots
            return _orig_gather(kv_cache, slots)

        def _decode(self, codes):
            k, v = _orig_decode(self, codes)
            slots = _CTX.get("slots")
            st = _CTX.get("store")
            if slots is not None and st is not None and slots.shape[0] == codes.shape[0]:
                sel = [i for i, s in enumerate(slots.tolist()) if s in _CTX["sinks"]]
                if sel:
                    si = torch.tensor(sel)
                    blk = slots[si] // _CTX["bs"]
                    ek, ev = st[blk, :, 0], st[blk, :, 1]  # [n, H, D]
                    if self.k_rotation is not None:
                        ek = self.k_rotation.forward(ek)
                    if self.v_rotation is not None:
                        ev = self.v_rotation.forward(ev)
                    parts = os.environ.get("E8_SINK_PARTS", "kv")
                    if "k" in parts:
                        k[si] = ek.to(k.dtype)
                    if "v" in parts:
                        v[si] = ev.to(v.dtype)
            return k, v

        I.E8ImplMixin._e8_write_codes = _write
        I.E8ImplMixin._e8_attend = _attend
        R._gather_codes = _gather
        R.E8KVFormat.decode_kv_rotated = _decode
        print("sink experiment: patched", os.getpid(), flush=True)
    except Exception as e:  # noqa: BLE001
        print("sink experiment patch failed:", e, flush=True)


if os.environ.get("E8_SINK_EXPERIMENT") == "1":
    import builtins
    import sys
    _real_import = builtins.__import__
    _done = []

    def _hook(name, *a, **k):
        mod = _real_import(name, *a, **k)
        im, rm = sys.modules.get("e8vllm.vllm_plugin.impl"), sys.modules.get("e8vllm.kernels.reference")
        if not _done and hasattr(im, "E8ImplMixin") and hasattr(rm, "E8KVFormat") and hasattr(rm, "_gather_codes"):
            _done.append(1)
            _apply()
        return mod

    builtins.__import__ = _hook
