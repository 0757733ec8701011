from django.db import models


class Order(models.Model):  # type: ignore[misc]  # Django is untyped
    product = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=20, default="new")
    #: The worker process that shipped the order.
    shipped_by = models.IntegerField(null=True)

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product} ({self.status})"
