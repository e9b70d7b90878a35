"""The command layer's shared pieces: the option groups ``advvit.eval`` and ``advvit.analyze``
both take (:mod:`advvit.cli.options`), and the analyses ``advvit.analyze`` runs, one
registered sub-command each (:mod:`advvit.cli.analyses`). Library modules never import this
package."""
