"""The data machinery every task gets: per-item RNG (items.py), the resumable samplers
(sampler.py), fingerprints (fingerprint.py) and remote data folders (remote.py)."""
