"""``sdtune eval``: render every checkpoint of a run at each LoRA scale, score the images, report and recommend.

One pipeline, any scorer:

    core.py       what is measured and how results are shaped: ``Metric``, ``References``, ``Row``,
                  ``Rendered`` (one row's images), the ``Scorer`` protocol, ``EvalSpec`` and its cells
    run.py        rendering (cached cells, via ``sdtune.sample``) and ``run_eval``: prepare, render, score,
                  recommend, report
    report.py     the terminal table, report.json, report.md and metrics.png, for any scorer's metrics
    prompts.py    prompt templates, the identifier, the class noun
    dreambench.py the DreamBooth paper's protocol as data: DreamBench prompts, its metrics, Table 1, the rule
    paper.py      the paper's scorer: DINO, CLIP-I, CLIP-T, DIV, PRES with DINO and CLIP models

The micro world's scorer is ``sdtune.micro.measure.WorldScorer``: the micro package depends on this one, never
the reverse. A new metric is one ``Metric`` in its scorer's ``metrics`` and the code in its ``score`` that puts
a value under that key in each row's ``metrics``; the table, reports and plot follow.

Only ``run.py`` and ``paper.py`` import torch, so ``sdtune eval --help`` stays fast.
"""
