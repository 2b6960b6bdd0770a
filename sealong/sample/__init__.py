"""`sealong sample`: N samples per prompt over one shared prefix (sampler.py; KV caches in kv_cache.py)."""
