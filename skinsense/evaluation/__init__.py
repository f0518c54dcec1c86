"""Evaluation: what a trained model is worth, measured on the parts it never trained on.

One module per purpose: `predict` (forward passes: logits and features), `metrics`,
`fit` (temperature, referral threshold and gate, fitted on validation), `evaluate` (the
test part's report and figures), `ood` (the gate against the reference photos),
`compare` (the architectures side by side), `efficiency` (size and speed) and
`architecture` (one architecture's whole evaluation, one way: load once, fit, evaluate,
write the card once); the audit: `bootstrap` (lesion intervals), `subgroups`,
`ood_reference` (the reference photos) and `plots`. Import the module you need; this
package imports nothing, so the audit modules stay light.
"""
