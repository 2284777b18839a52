"""Evaluation of steered outputs: methods side by side (``methods``), fluency judges (``judges``),
several topics at once (``topic_suite``) and the HTML report (``report``)."""
