"""Object detection (`task: detection`), data to evaluation: the built-in synthetic set, COCO
and YOLO annotations, the detection prepare step and its data gate by file and by box, the
FCOS detector, its training and COCO mAP. Export, registration and promotion of a detector
are in components/detection_release. The flows, the command and the server pick these
components by `task` or by a model's metadata."""
