"""`ksmh doctor`: why memory does or does not merge, and who shares merged pages with whom.

    paths.py      where the kernel files are (injectable roots)
    facts.py      read once: KSM knobs/counters, THP, MemAvailable, NUMA, each examined
                  process's smaps, ksm_stat, pins, and, as root, content keys (harness.shadow)
                  and KSM page frames; the knob watch (watch.py) runs meanwhile
    analysis.py   scanned / could merge / merged per process, would-merge per ignored VMA, the
                  sharing matrix (exposure.py)
    findings/     one module per family, each finding with severity, evidence and a fix
    render.py     text or JSON; exit status 1 when a finding needs action
    diagnosis.py  diagnose(): all of the above
    cli.py        `ksmh doctor`; readme.py renders the catalogue (catalog.py) into README.md

This package's __init__ imports nothing, so `ksmh` starts fast whatever the command.
"""
