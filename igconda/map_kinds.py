"""The names of IgCONDA's anomaly map kinds, in one torch-free place (configs validate them).

The maps themselves are computed by :func:`igconda.diffusion.ddim.anomaly_maps`:

- ``abs``: |x − x̂_w|, the paper's map;
- ``hot``: max(x − x̂_w, 0);
- ``guidance``: max(x̂_∅ − x̂_w, 0), what guidance towards healthy removed;
- ``guidance_abs``: |x̂_∅ − x̂_w|;

and :data:`CONTROL` is the w = 0 control |x − x̂_∅|, the DDIM round trip's error alone, which is
reported beside every study and is never a tuning candidate.
"""

MAP_KINDS: tuple[str, ...] = ("abs", "hot", "guidance", "guidance_abs")
CONTROL = "w0"
