"""`cli.py features report`: a picture of an extraction, one self-contained HTML page (see report/build.py).

Downstream of both stages' inputs: it reads feature sets (features/) and decodes their source
videos (extract/), which features/ itself never does.
"""
