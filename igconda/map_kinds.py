"""The names of IgCONDA's anomaly map kinds, in one torch-free place (configs validate them).

The maps themselves are computed by :func:`igconda.diffusion.counterfactual.anomaly_maps`:

- ``abs``: |x − x̂_w|, the paper's map;
- ``hot``: max(x − x̂_w, 0);
- ``guidance``: max(x̂_∅ − x̂_w, 0), what guidance towards healthy removed;
- ``guidance_abs``: |x̂_∅ − x̂_w|;

and the w = 0 controls, the DDIM round trip's error alone, reported beside every study and
never tuning candidates: :data:`CONTROL` |x − x̂_∅| (the control of ``abs``) and
:data:`CONTROL_HOT` max(x − x̂_∅, 0) (the control of ``hot``). A map must be compared with the
control of its own sign: a one-sided map scores higher than a two-sided one on hot lesions
whether or not guidance did anything. The guidance maps need no control: at w = 0 they are 0.
"""

MAP_KINDS: tuple[str, ...] = ("abs", "hot", "guidance", "guidance_abs")
CONTROL = "w0"
CONTROL_HOT = "w0_hot"
CONTROLS: tuple[str, ...] = (CONTROL, CONTROL_HOT)
#: Each map's formula, as figures label it.
FORMULAS: dict[str, str] = {"abs": "|x − x̂|", "hot": "max(x − x̂, 0)", "guidance": "max(x̂∅ − x̂, 0)",
                            "guidance_abs": "|x̂∅ − x̂|", CONTROL: "|x − x̂∅|", CONTROL_HOT: "max(x − x̂∅, 0)"}


def matching_control(kind: str) -> str:
    """The w = 0 control of the same sign as map ``kind`` (``hot`` → ``w0_hot``, else ``w0``)."""
    return CONTROL_HOT if kind == "hot" else CONTROL
