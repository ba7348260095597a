"""Object detection (`task: detection`): the built-in synthetic set, COCO and YOLO annotations,
the detection prepare step and its data gate by file and by box, the RetinaNet, its training,
COCO mAP, export, registration and promotion (mAP gates, a paired bootstrap). The flows, the
command and the server pick these components by `task` or by a model's metadata."""
