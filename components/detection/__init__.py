"""Object detection (`task: detection`): the built-in synthetic set, COCO and YOLO annotations,
the detection prepare step and its data gate by file and by box. Last in ORDER: the flows and
the command pick these components when params.yaml says `task: detection`."""
