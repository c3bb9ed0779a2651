"""selfsup: self-supervised visual pretraining and transfer evaluation.

Implements Kolesnikov et al. 2019 (Revisiting SSL), Misra & van der Maaten 2020 (PIRL) and
Ericsson et al. 2021 (How Well Do Self-Supervised Models Transfer?) as one tool.
"""

__version__ = "0.1.0"
