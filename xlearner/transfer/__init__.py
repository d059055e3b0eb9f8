"""Transfer evaluation: how good a backbone is on held-out downstream data sets.

- :mod:`xlearner.transfer.probe`: frozen features and the L-BFGS linear probe
  (classification, :func:`~xlearner.transfer.probe.probe_top1`);
- :mod:`xlearner.transfer.finetune`: a fresh detection / segmentation head fine-tuned
  with the backbone;
- :mod:`xlearner.transfer.evaluate`: every backbone on every downstream set, one report
  row per backbone (what the transfer stage runs);
- :mod:`xlearner.transfer.report`: the comparison report (json, md, png).
"""
