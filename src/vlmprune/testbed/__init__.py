"""An offline grounding testbed: procedural scenes and a tiny LLaVA trained on them (issue 5).

- `vlmprune.testbed.scenes`: seeded scenes (shapes on a grey canvas), referring expressions with boxes,
  and questions that need no localization; train / test splits by seed range.
- `vlmprune.testbed.model`: the model's config, tokenizer (word-level + coordinate bins) and processor,
  `load_testbed()` for the shipped checkpoint.
- `vlmprune.testbed.train`: the resumable two-stage training (`vlmprune testbed train`).
- `vlmprune.testbed.evaluate`: localization Acc@IoU>=0.5 and other-question accuracy (`vlmprune testbed eval`).
- `vlmprune.testbed.dependence`: localization without the referred object's tokens, against as many others.
- `vlmprune.testbed.probe`: linear probes of one object's colour and shape along the model (tower to answer).
- `vlmprune.testbed.demo`: every method at matched FLOPs on the held-out split (`vlmprune demo`).

Submodules are imported on use, so `import vlmprune.testbed` stays cheap.
"""
