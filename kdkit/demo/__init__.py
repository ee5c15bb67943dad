"""`kdkit demo`: the whole flow on real images (MNIST) with no download."""

# The KD terms the replayed and online rows are trained with (`--losses`), and each one's settings, chosen
# on held-out training images (docs/demo.md): `kdkit train --kd-loss NAME` with these flags. kl's temperature
# and alpha are the demo's --kd-temperature / --kd-alpha.
LOSS_SETTINGS = {
    "kl": {},
    "dkd": {"kd_temperature": 4.0, "kd_alpha": 0.5, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 1},
    "kl-ls": {"kd_temperature": 2.0, "kd_alpha": 0.9},
    "dkd-ls": {"kd_temperature": 2.0, "kd_alpha": 0.5, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 1},
}
