"""Training: the loop (SGD/AdamW, augmentation, resume), the teacher every verb uses and the
student trained on a distilled set."""

from .loop import (TrainConfig, TrainResult, augment_batch, crop_boxes, cutmix, evaluate, random_resized_crop,
                   resize_boxes, same_config, train, training_seconds)
from .teacher import (Teacher, augmentation, build_network, default_epochs, default_image_size, default_model,
                      load_or_train_teacher, student_train_config, teacher_train_config, train_student,
                      validation_split,
                      STUDENT_PROTOCOLS, wmdd_student_config)

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "augment_batch", "same_config", "Teacher",
           "load_or_train_teacher", "validation_split", "train_student", "teacher_train_config", "student_train_config", "build_network",
           "default_model", "default_image_size", "default_epochs", "augmentation", "wmdd_student_config",
           "STUDENT_PROTOCOLS", "cutmix", "random_resized_crop", "crop_boxes", "resize_boxes", "training_seconds"]
