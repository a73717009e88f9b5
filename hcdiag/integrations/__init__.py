"""Framework adapters for :class:`hcdiag.monitor.Monitor`.

* :mod:`hcdiag.integrations.transformers`: :class:`~hcdiag.integrations.transformers.HcdiagCallback`, a
  ``transformers.TrainerCallback``;
* :mod:`hcdiag.integrations.lightning`: :class:`~hcdiag.integrations.lightning.HcdiagLightningCallback`, a
  Lightning ``Callback`` (``lightning`` or ``pytorch_lightning``; importing it without either raises
  ImportError saying so).

Nothing here is imported by ``import hcdiag``; each module imports its framework when it is imported.
"""
