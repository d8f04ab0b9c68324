"""The capacity search (`python -m lora_lightning capacity`): how many new facts a LoRA adapter
holds, per adapter variant.

`search` (the capacity file, the search rule and where each chain's search stands), `runner`
(rounds of probes on the sweep's launchers, then the full `test` at each bracket) and `report`
(capacity.csv, report.md and the plots). Import from the submodules: `search` is cheap (no
Lightning), and the command loads `runner` only once the file is read.
"""
