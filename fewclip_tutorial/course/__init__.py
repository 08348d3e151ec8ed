"""The course tools: notebook exercises, the grader, the student edition, notebook checks.

* :mod:`.exercises`: ``check(student_fn)`` against a reference on random inputs, the
  exercise registry (``get_exercise``);
* :mod:`.catalog`: every chapter's exercises, each referring to the method it teaches
  (imported with this package, so the registry is complete);
* :mod:`.grading` (``fewclip grade``) and :mod:`._grading_child` (its sandboxed side);
* :mod:`.assignments`: the student edition of the notebooks;
* :mod:`.nbcheck`: ``assert_committed``, trained numbers in a notebook within a tolerance.

The course refers to the methods; no method imports the course.
"""

from fewclip_tutorial.course import catalog

__all__ = ["catalog"]
