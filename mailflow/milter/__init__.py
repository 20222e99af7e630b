"""The milter front end: mailflow as a content filter called by Postfix or Sendmail.

``protocol`` is the sans-IO codec, ``session`` maps one conversation onto the pipeline,
``diff`` turns the pipeline's result into modification actions, ``server`` listens.
See docs/milter.md.
"""
