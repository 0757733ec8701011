"""The shop's tasks: found by ``app.autodiscover_tasks()`` and bound to the project's app."""

import os

from celeriac import shared_task

from .models import Order


@shared_task
def create_order(product: str, quantity: int) -> int:
    return int(Order.objects.create(product=product, quantity=quantity).pk)


@shared_task
def ship_order(order_id: int) -> bool:
    """Mark the order shipped; False when there is no such order."""
    updated = Order.objects.filter(pk=order_id, status="new").update(
        status="shipped", shipped_by=os.getpid()
    )
    return bool(updated == 1)


@shared_task
def count_orders(status: str) -> int:
    return int(Order.objects.filter(status=status).count())
