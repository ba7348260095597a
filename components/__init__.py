"""lensflow's components: plain Python steps that read and write files, never Prefect.

Grouped by concern into sub-packages. Each may import only the packages before it in ORDER
(tests/test_layout.py enforces it); `preflight` sits here because it checks across them. No
package re-exports anything, so importing one loads only what it names.
"""

ORDER = (
    "core",
    "data",
    "training",
    "scoring",
    "drift",
    "release",
    "evaluation",
    "monitoring",
    "experiments",
    "detection",
    "detection_release",
    "labelling",
)
