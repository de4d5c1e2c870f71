"""Training one concept: trainer.py (the step loop, DreamBooth loss, resumable checkpoints) · quiet.py
(the quiet penalty's activation bank) · class_pictures.py (the base's class-prompt pictures, cached per
node) · data.py (a client's folder of pictures; imports no diffusers, so a job's driver can read it).
"""
